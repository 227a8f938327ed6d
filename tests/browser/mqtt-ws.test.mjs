// MQTT over WebSocket from a real browser (issue 12): MQTT.js in Debian's chromium connects
// to MQTT_WS_URL with MQTT 5, subscribes to an emoji topic, publishes to it with user
// properties, and reads the message back in the page. Run by scripts/browser-test.sh, which
// starts the broker and sets MQTT_WS_URL.

import test from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { echoPage, launch, nodeModule, ROOT, screenshotPath, serve } from './lib.mjs';

const broker = process.env.MQTT_WS_URL;

test('MQTT.js in chromium: an emoji topic and user properties round-trip over ws://', async (t) => {
  assert.ok(broker, 'MQTT_WS_URL is set (run scripts/browser-test.sh)');
  const site = await serve({
    '/': { type: 'text/html; charset=utf-8', file: join(ROOT, 'tests/browser/mqtt-ws.html') },
    '/mqtt.min.js': { type: 'text/javascript', file: nodeModule('mqtt/dist/mqtt.min.js') },
  });
  t.after(() => site.close());
  const browser = await launch();
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 900, height: 520 } });
  echoPage(page);
  await page.goto(`${site.url}/?broker=${encodeURIComponent(broker)}`);
  const handle = await page.waitForFunction(() => window.mqttResult, null, { timeout: 20_000 });
  const got = await handle.jsonValue();
  await page.screenshot({ path: screenshotPath(`mqtt-ws-${process.env.BROKER || 'broker'}`) });
  assert.equal(got.error, undefined, `the page failed: ${got.error}`);
  assert.equal(got.topic, 'sensors/🌡/temp');
  assert.equal(got.payload, '21.5 °C 🌡');
  assert.equal(got.qos, 1);
  assert.equal(got.contentType, 'text/plain; charset=utf-8');
  assert.deepEqual(got.userProperties, { unit: 'celsius', source: 'browser 🧪' });
  // What the page shows is what it received.
  assert.equal(await page.textContent('#topic'), 'sensors/🌡/temp');
  assert.equal(await page.textContent('#status'), 'received it back');
});
