// Shared by the browser tests (scripts/browser-test.sh): launch Debian's chromium through
// playwright-core, serve a test's page and scripts from a local HTTP server, and say where
// screenshots go. Nothing here downloads a browser: playwright-core drives the system one.

import { chromium } from 'playwright-core';
import { createServer } from 'node:http';
import { mkdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository's root (this file is in tests/browser/). */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The browser: Debian's chromium, or CHROMIUM from the environment. */
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/** Headless chromium; as root it needs --no-sandbox (its sandbox refuses to run as root). */
export async function launch() {
  const args = process.getuid && process.getuid() === 0 ? ['--no-sandbox'] : [];
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args });
}

/**
 * Serves `routes` ({ path: { type, body } or { type, file } }) on 127.0.0.1 at a port the
 * kernel picks; resolves to { url, close }. Anything else is 404.
 */
export async function serve(routes) {
  const server = createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    const route = routes[path];
    if (!route && path === '/favicon.ico') {
      res.writeHead(204).end();
      return;
    }
    if (!route) {
      res.writeHead(404).end('not found');
      return;
    }
    const body = route.file ? readFileSync(route.file) : route.body;
    res.writeHead(200, { 'content-type': route.type, 'cache-control': 'no-store' }).end(body);
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    close: () => new Promise((ok) => server.close(ok)),
  };
}

/** A file from this directory's node_modules (e.g. 'mqtt/dist/mqtt.min.js'). */
export function nodeModule(path) {
  return join(ROOT, 'tests', 'browser', 'node_modules', path);
}

/** target/screenshots/NAME.png, its directory made. */
export function screenshotPath(name) {
  const dir = process.env.SCREENSHOTS || join(ROOT, 'target', 'screenshots');
  mkdirSync(dir, { recursive: true });
  return join(dir, `${name}.png`);
}

/** Forwards the page's console and errors to the test's output (shown on failure). */
export function echoPage(page) {
  page.on('console', (m) => console.log(`page ${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
}
