// The web dashboard (issue 14) in Debian's chromium, against a broker with traffic, a work
// queue and a dead letter (scripts/browser-test.sh starts it with an admin token and sets
// FERRYMQ_HTTP_URL, FERRYMQ_MQTT_URL, FERRYMQ_ADMIN_TOKEN). The test signs in, checks that the
// numbers shown are the API's, redrives the dead letter from the UI and sees it consumed,
// kicks a client from the UI and sees it disconnected, and saves screenshots.

import test from 'node:test';
import assert from 'node:assert/strict';
import mqtt from 'mqtt';
import { echoPage, launch, screenshotPath } from './lib.mjs';

const http = process.env.FERRYMQ_HTTP_URL;
const broker = process.env.FERRYMQ_MQTT_URL;
const token = process.env.FERRYMQ_ADMIN_TOKEN;

async function api(method, path, body) {
  const res = await fetch(`${http}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, json: text ? JSON.parse(text) : {} };
}

/** An MQTT 5 client over TCP, connected. */
function client(clientId, options = {}) {
  return new Promise((ok, fail) => {
    const c = mqtt.connect(broker, { protocolVersion: 5, clientId, reconnectPeriod: 0, ...options });
    c.once('connect', () => ok(c));
    c.once('error', fail);
  });
}

const until = async (what, f, ms = 10_000) => {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
};

test('the dashboard shows what the API says, redrives a dead letter and kicks a client', {
  skip: process.env.BROKER === 'mosquitto' ? 'the dashboard is ferrymq\'s' : false,
}, async (t) => {
  assert.ok(http && broker && token, 'run scripts/browser-test.sh');
  // Without the token: nothing but the sign-in page.
  assert.equal((await fetch(`${http}/api/v1/overview`)).status, 401);
  const root = await fetch(`${http}/`, { redirect: 'manual' });
  assert.equal(root.status, 303);
  assert.equal(root.headers.get('location'), '/login');

  // A queue, a dead letter in it (rejected with 0x99), a retained message, and a client to kick.
  const created = await api('POST', '/api/v1/queues', { name: 'jobs', filter: 'jobs/#', max_attempts: 3 });
  assert.ok([200, 201].includes(created.status), JSON.stringify(created.json));
  const rejecter = await client('rejecter', { customHandleAcks: (_t, _m, _p, done) => done(0x99) });
  await rejecter.subscribeAsync('$queue/jobs', { qos: 1 });
  const publisher = await client('publisher');
  await publisher.publishAsync('jobs/1', 'job payload 🧾', {
    qos: 1,
    properties: { userProperties: { traceparent: '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' } },
  });
  await publisher.publishAsync('status/door', 'open', { qos: 1, retain: true });
  await until('the dead letter', async () => (await api('GET', '/api/v1/queues/jobs')).json.stats?.dead_letters === 1);
  rejecter.end(true);
  const victim = await client('victim');
  const kicked = new Promise((ok) => victim.on('disconnect', (p) => ok(p.reasonCode)));
  t.after(() => { publisher.end(true); victim.end(true); });

  const browser = await launch();
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  echoPage(page);
  page.on('dialog', (d) => d.accept());

  // Sign in.
  await page.goto(`${http}/`);
  assert.ok(page.url().endsWith('/login'), page.url());
  await page.fill('input[name=token]', 'wrong');
  await page.click('button[type=submit]');
  await page.waitForSelector('#failed:not([hidden])');
  await page.fill('input[name=token]', token);
  await page.click('button[type=submit]');
  await page.waitForSelector('#overview-cards .card');

  // Overview: the cards are the API's numbers.
  const want = (await api('GET', '/api/v1/overview')).json;
  for (const key of ['connections', 'retained', 'queues', 'dead_letters']) {
    const shown = await page.textContent(`[data-metric=${key}] .value`);
    assert.equal(Number(shown), want[key], `${key}: shown ${shown}, API ${want[key]}`);
  }
  await page.waitForTimeout(2500); // a second sample for the rate chart
  await page.screenshot({ path: screenshotPath('dashboard-overview') });

  // Queues: depth and dead letters as the API has them.
  await page.click('nav a[data-tab=queues]');
  await page.waitForSelector('#queues-table tr[data-queue=jobs]');
  const q = (await api('GET', '/api/v1/queues/jobs')).json;
  assert.equal(Number(await page.textContent('tr[data-queue=jobs] [data-field=depth]')), q.stats.depth);
  assert.equal(Number(await page.textContent('tr[data-queue=jobs] [data-field=dead_letters]')), 1);

  // Retained messages.
  await page.click('nav a[data-tab=retained]');
  await page.waitForSelector('#retained-table tr[data-topic="status/door"]');

  // Dead letters: the detail shows payload, cause and trace id; redrive it, and a consumer
  // gets it.
  await page.click('nav a[data-tab=dead-letters]');
  const row = await page.waitForSelector('#dlq-table tbody tr');
  await page.click('#dlq-table tbody tr a');
  await page.waitForSelector('#dlq-detail:not([hidden])');
  const detail = await page.textContent('#dlq-detail');
  assert.match(detail, /job payload 🧾/);
  assert.match(detail, /rejected/);
  assert.match(detail, /0af7651916cd43dd8448eb211c80319c/);
  await page.screenshot({ path: screenshotPath('dashboard-dead-letter') });
  const consumer = await client('consumer');
  const got = new Promise((ok) => consumer.on('message', (topic, payload) => ok({ topic, payload: payload.toString() })));
  await consumer.subscribeAsync('$queue/jobs', { qos: 1 });
  t.after(() => consumer.end(true));
  await row.$eval('button.primary', (b) => b.click());
  const consumed = await Promise.race([got, new Promise((_, fail) => setTimeout(() => fail(new Error('not consumed')), 10_000))]);
  assert.deepEqual(consumed, { topic: 'jobs/1', payload: 'job payload 🧾' });
  await until('the dead letter left', async () => (await api('GET', '/api/v1/queues/jobs')).json.stats?.dead_letters === 0);

  // Clients: kick the victim from the UI; it gets DISCONNECT 0x98.
  await page.click('nav a[data-tab=clients]');
  await page.fill('#clients-search input', 'victim');
  await page.click('#clients-search button');
  const victimRow = await page.waitForSelector('#clients-table tr[data-client=victim]');
  await page.screenshot({ path: screenshotPath('dashboard-clients') });
  await victimRow.$eval('button.danger', (b) => b.click());
  assert.equal(await Promise.race([kicked, new Promise((_, fail) => setTimeout(() => fail(new Error('not kicked')), 10_000))]), 0x98);
  await until('victim gone', async () => (await api('GET', '/api/v1/clients/victim')).status === 404);

  await page.click('nav a[data-tab=alarms]');
  await page.waitForSelector('#alarms-table tbody tr');
  await page.screenshot({ path: screenshotPath('dashboard-alarms') });
});
