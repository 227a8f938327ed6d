// FerryMQ dashboard: plain JS over the admin API (docs/api.md). No build step, no framework.
// Every list is paged with the API's `next_cursor`; numbers come straight from the API, so
// what the page shows is what `curl` would show.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ''));
  return e;
};
const time = (ms) => (ms == null ? '' : new Date(ms).toLocaleString());
const enc = encodeURIComponent;

function status(text, error = false) {
  const s = $('#status');
  s.textContent = text;
  s.classList.toggle('error', error);
}

/** One API call: JSON in and out, errors shown in the header. */
async function api(method, path, body) {
  const init = { method, headers: {}, credentials: 'same-origin' };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 401) {
    location.href = '/login';
    throw new Error('the admin token is needed');
  }
  const text = await res.text();
  const json = text ? JSON.parse(text) : {};
  if (!res.ok) {
    status(`${method} ${path}: ${json.error || res.status}`, true);
    throw new Error(json.error || String(res.status));
  }
  return json;
}

/** A paged table: `load(cursor)` returns {items, next_cursor}; `row(item)` a <tr>. */
function pager(table, more, load, row) {
  let cursor = null;
  const tbody = $('tbody', table);
  const next = async (reset) => {
    if (reset) {
      cursor = null;
      tbody.replaceChildren();
    }
    const page = await load(cursor);
    for (const item of page.items) tbody.append(row(item));
    cursor = page.next_cursor;
    more.hidden = cursor == null;
  };
  more.addEventListener('click', () => next(false));
  return () => next(true);
}

// ---- overview: cards and two live charts ----

const history = { rateIn: [], rateOut: [], conns: [] };
let last = null;

function chart(canvas, series, colors) {
  const ctx = canvas.getContext('2d');
  const { width: w, height: h } = canvas;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...series.flat());
  ctx.fillStyle = '#667085';
  ctx.font = '11px system-ui';
  ctx.fillText(String(Math.round(max)), 4, 12);
  series.forEach((points, i) => {
    ctx.strokeStyle = colors[i];
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach((v, x) => {
      const px = (x / 59) * (w - 8) + 4;
      const py = h - 4 - (v / max) * (h - 20);
      if (x === 0) ctx.moveTo(px, py);
      else ctx.lineTo(px, py);
    });
    ctx.stroke();
  });
}

async function overview() {
  const o = await api('GET', '/api/v1/overview');
  const now = Date.now();
  if (last) {
    const dt = Math.max(0.001, (now - last.at) / 1000);
    history.rateIn.push((o.messages_received - last.in) / dt);
    history.rateOut.push((o.messages_sent - last.out) / dt);
  }
  last = { at: now, in: o.messages_received, out: o.messages_sent };
  history.conns.push(o.connections);
  for (const s of Object.values(history)) while (s.length > 60) s.shift();
  const cards = [
    ['Connections', o.connections, 'connections'], ['Sessions', o.sessions, 'sessions'],
    ['Subscriptions', o.subscriptions, 'subscriptions'], ['Retained', o.retained, 'retained'],
    ['Queues', o.queues, 'queues'], ['Queued messages', o.queued_messages, 'queued_messages'],
    ['Dead letters', o.dead_letters, 'dead_letters'], ['Messages in', o.messages_received, 'messages_received'],
    ['Messages out', o.messages_sent, 'messages_sent'],
  ];
  $('#overview-cards').replaceChildren(...cards.map(([label, value, key]) =>
    el('div', { class: 'card', 'data-metric': key },
      el('div', { class: 'label' }, label), el('div', { class: 'value' }, String(value)))));
  chart($('#chart-rate'), [history.rateIn, history.rateOut], ['#1f6feb', '#2e7d32']);
  chart($('#chart-conn'), [history.conns], ['#7b61ff']);
  $('#overview-alarms').replaceChildren(...(o.alarms.length
    ? o.alarms.map((a) => el('li', { class: 'alarm-on' }, `${a.name}: ${a.message}`))
    : [el('li', {}, 'none')]));
  status(`updated ${new Date(now).toLocaleTimeString()} · v${o.version}`);
}

// ---- clients ----

let clientSearch = '';
const loadClients = pager($('#clients-table'), $('#clients-more'),
  (c) => api('GET', `/api/v1/clients?limit=50${clientSearch ? `&search=${enc(clientSearch)}` : ''}${c ? `&cursor=${enc(c)}` : ''}`),
  (c) => el('tr', { 'data-client': c.client_id },
    el('td', {}, el('a', { href: '#clients', onclick: () => showClient(c.client_id) }, c.client_id)),
    el('td', { class: c.connected ? 'yes' : '' }, c.connected ? 'yes' : 'no'),
    el('td', {}, c.protocol), el('td', {}, c.address ? `${c.address} (${c.listener})` : ''),
    el('td', { class: 'num' }, String(c.subscriptions)),
    el('td', { class: 'num' }, String(c.inflight)), el('td', { class: 'num' }, String(c.queued)),
    el('td', {}, c.connected ? el('button', { class: 'danger', onclick: () => kick(c.client_id) }, 'Kick') : '')));

$('#clients-search').addEventListener('submit', (e) => {
  e.preventDefault();
  clientSearch = new FormData(e.target).get('search');
  loadClients();
});

async function showClient(id) {
  const c = await api('GET', `/api/v1/clients/${enc(id)}`);
  const d = $('#client-detail');
  d.hidden = false;
  d.replaceChildren(el('h3', {}, c.client_id),
    el('p', {}, `${c.protocol}, ${c.connected ? `connected from ${c.address} (${c.listener})` : `disconnected ${time(c.disconnected_at_ms)}`}, session expiry ${c.session_expiry_s} s, ${c.inflight} in flight, ${c.queued} queued`),
    el('table', {}, el('thead', {}, el('tr', {}, el('th', {}, 'Filter'), el('th', {}, 'QoS'), el('th', {}, 'Group'), el('th', {}, 'Queue'))),
      el('tbody', {}, ...c.subscriptions.map((s) => el('tr', {}, el('td', {}, s.filter), el('td', {}, String(s.qos)), el('td', {}, s.group ?? ''), el('td', {}, s.queue ?? ''))))));
}

async function kick(id) {
  if (!confirm(`Disconnect ${id}?`)) return;
  await api('DELETE', `/api/v1/clients/${enc(id)}`);
  status(`disconnected ${id}`);
  await loadClients();
}

// ---- topics and subscriptions ----

const loadTopics = pager($('#topics-table'), $('#topics-more'),
  (c) => api('GET', `/api/v1/topics?limit=100${c ? `&cursor=${enc(c)}` : ''}`),
  (t) => el('tr', {}, el('td', {}, t.filter), el('td', { class: 'num' }, String(t.subscriptions))));
const loadSubs = pager($('#subs-table'), $('#subs-more'),
  (c) => api('GET', `/api/v1/subscriptions?limit=100${c ? `&cursor=${enc(c)}` : ''}`),
  (s) => el('tr', {}, el('td', {}, s.client_id), el('td', {}, s.filter), el('td', {}, String(s.qos)),
    el('td', {}, s.group ?? ''), el('td', {}, s.queue ?? '')));

// ---- retained ----

const topicPath = (t) => t.split('/').map(enc).join('/');
const loadRetained = pager($('#retained-table'), $('#retained-more'),
  (c) => api('GET', `/api/v1/retained?limit=100${c ? `&cursor=${enc(c)}` : ''}`),
  (m) => el('tr', { 'data-topic': m.topic },
    el('td', {}, el('a', { href: '#retained', onclick: () => showRetained(m.topic) }, m.topic)),
    el('td', {}, String(m.qos)), el('td', { class: 'num' }, String(m.payload_bytes)), el('td', {}, time(m.received_at_ms)),
    el('td', {}, el('button', { class: 'danger', onclick: () => deleteRetained(m.topic) }, 'Delete'))));

async function showRetained(topic) {
  const m = await api('GET', `/api/v1/retained/${topicPath(topic)}`);
  const d = $('#retained-detail');
  d.hidden = false;
  d.replaceChildren(el('h3', {}, m.topic), el('pre', {}, m.payload ?? `base64: ${m.payload_base64}`),
    el('pre', {}, JSON.stringify(m.properties, null, 2)));
}

async function deleteRetained(topic) {
  if (!confirm(`Delete the retained message of ${topic}?`)) return;
  await api('DELETE', `/api/v1/retained/${topicPath(topic)}`);
  status(`deleted ${topic}`);
  await loadRetained();
}

// ---- queues ----

async function loadQueues() {
  const { queues } = await api('GET', '/api/v1/queues');
  $('#queues-table tbody').replaceChildren(...queues.map((q) => el('tr', { 'data-queue': q.name },
    el('td', {}, q.name), el('td', {}, [].concat(q.definition.filter).join(', ')),
    el('td', { class: 'num', 'data-field': 'depth' }, String(q.stats.depth)),
    el('td', { class: 'num' }, String(q.stats.leased)), el('td', { class: 'num' }, String(q.stats.delayed)),
    el('td', { class: 'num', 'data-field': 'dead_letters' }, String(q.stats.dead_letters)),
    el('td', { class: 'num' }, String(q.stats.consumers)), el('td', { class: 'num' }, String(q.stats.acked)),
    el('td', {}, el('a', { href: '#dead-letters', onclick: () => { dlqQueue = q.name; } }, 'Dead letters')))));
  const select = $('#dlq-filter select[name=queue]');
  const keep = dlqQueue || select.value;
  select.replaceChildren(...queues.filter((q) => !q.name.startsWith('$')).map((q) => el('option', { value: q.name }, q.name)));
  if (keep) select.value = keep;
  return queues;
}

// ---- dead letters ----

let dlqQueue = '';
let dlqFilter = {};
const filterQuery = () => Object.entries(dlqFilter).filter(([, v]) => v).map(([k, v]) => `&${k}=${enc(v)}`).join('');
const loadDeadLetters = pager($('#dlq-table'), $('#dlq-more'),
  (c) => (dlqQueue
    ? api('GET', `/api/v1/queues/${enc(dlqQueue)}/dead-letters?limit=50${filterQuery()}${c != null ? `&cursor=${c}` : ''}`)
    : Promise.resolve({ items: [], next_cursor: null })),
  (d) => el('tr', { 'data-dead-letter': String(d.id) },
    el('td', {}, el('a', { href: '#dead-letters', onclick: () => showDeadLetter(d) }, String(d.id))),
    el('td', {}, d.topic), el('td', {}, d.cause), el('td', { class: 'num' }, String(d.attempts)),
    el('td', {}, d.failures.length ? d.failures[d.failures.length - 1].reason : ''), el('td', {}, time(d.dead_lettered_ms)),
    el('td', {}, el('button', { class: 'primary', onclick: () => redrive(d.id) }, 'Redrive'), ' ',
      el('button', { class: 'danger', onclick: () => discard(d.id) }, 'Discard'))));

function showDeadLetter(d) {
  const box = $('#dlq-detail');
  box.hidden = false;
  box.replaceChildren(el('h3', {}, `Dead letter ${d.id} of ${d.queue}`),
    el('p', {}, `topic ${d.topic}, cause ${d.cause}, ${d.attempts} attempts, first enqueued ${time(d.first_enqueued_ms)}, dead-lettered ${time(d.dead_lettered_ms)}`),
    el('p', {}, `trace id: ${d.trace_id ?? 'none'}`),
    el('h4', {}, 'Payload'), el('pre', {}, d.payload ?? `base64: ${d.payload_base64}`),
    el('h4', {}, 'Properties'), el('pre', {}, JSON.stringify(d.properties, null, 2)),
    el('h4', {}, 'Failures'),
    el('table', {}, el('thead', {}, el('tr', {}, el('th', {}, 'At'), el('th', {}, 'Code'), el('th', {}, 'Reason'), el('th', {}, 'Consumer'))),
      el('tbody', {}, ...d.failures.map((f) => el('tr', {}, el('td', {}, time(f.at_ms)), el('td', {}, `0x${f.reason_code.toString(16)}`), el('td', {}, f.reason), el('td', {}, f.consumer))))));
}

async function redrive(id) {
  const r = await api('POST', `/api/v1/queues/${enc(dlqQueue)}/dead-letters/redrive`, { ids: [id] });
  status(`redriven: ${r.moved} of ${r.selected}`);
  await loadDeadLetters();
}

async function discard(id) {
  if (!confirm(`Discard dead letter ${id} for good?`)) return;
  await api('DELETE', `/api/v1/queues/${enc(dlqQueue)}/dead-letters/${id}`);
  status(`discarded ${id}`);
  await loadDeadLetters();
}

$('#dlq-filter').addEventListener('submit', (e) => {
  e.preventDefault();
  const f = new FormData(e.target);
  dlqQueue = f.get('queue') || '';
  dlqFilter = { cause: f.get('cause'), reason: f.get('reason'), topic: f.get('topic') };
  loadDeadLetters();
});

$('#dlq-purge').addEventListener('click', async () => {
  if (!dlqQueue || !confirm(`Purge every dead letter of ${dlqQueue} matching this filter?`)) return;
  const body = Object.fromEntries(Object.entries(dlqFilter).filter(([, v]) => v));
  const r = await api('POST', `/api/v1/queues/${enc(dlqQueue)}/dead-letters/purge`, body);
  status(`purged ${r.purged}`);
  await loadDeadLetters();
});

// ---- alarms ----

async function loadAlarms() {
  const { alarms } = await api('GET', '/api/v1/alarms');
  $('#alarms-table tbody').replaceChildren(...alarms.map((a) => el('tr', {},
    el('td', {}, a.name), el('td', { class: a.active ? 'alarm-on' : '' }, a.active ? 'active' : 'no'),
    el('td', {}, time(a.since)), el('td', {}, time(a.cleared)), el('td', {}, a.message))));
}

// ---- tabs ----

const loaders = {
  overview,
  clients: loadClients,
  topics: () => Promise.all([loadTopics(), loadSubs()]),
  retained: loadRetained,
  queues: loadQueues,
  'dead-letters': async () => { await loadQueues(); dlqQueue = $('#dlq-filter select[name=queue]').value; await loadDeadLetters(); },
  alarms: loadAlarms,
};

async function show() {
  const tab = (location.hash || '#overview').slice(1);
  const name = loaders[tab] ? tab : 'overview';
  for (const s of document.querySelectorAll('.tab')) s.classList.toggle('active', s.id === `tab-${name}`);
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.dataset.tab === name);
  try {
    await loaders[name]();
  } catch (e) {
    console.error(e);
  }
}

window.addEventListener('hashchange', show);
setInterval(() => {
  if ((location.hash || '#overview') === '#overview') overview().catch(() => {});
}, 2000);
show();
