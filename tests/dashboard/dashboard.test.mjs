// The dashboard in headless Chromium (Debian's package, driven by playwright-core) against real
// pods on 127.0.0.1: the page loads cleanly and shows the node, a pod that joins, a model a
// peer serves, a streamed chat answer naming the pod that served it, and asks for a key when
// the node has keys. Saves a screenshot with three pods to target/dashboard.png.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { chromium } from 'playwright-core';

import { CHAT, Pod, ROOT } from './pods.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
// Chromium's own network traffic (updates, sync, QUIC probes) is off: the machine may have no
// network, and the page must need none.
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const KEY = 'sk-dashboard-right';

const short = (id) => `${id.slice(0, 8)}…${id.slice(-6)}`;

const pods = [];
let profileDir;
let browser;
let page;
const consoleErrors = [];

async function start(name, args, opts) {
  const pod = await Pod.start(name, args, opts);
  pods.push(pod);
  return pod;
}

function watch(p, errors) {
  const note = (e) => {
    errors.push(e);
    console.error(e);
  };
  p.on('console', (msg) => {
    if (msg.type() === 'error') note(`console: ${msg.text()} (${msg.location().url})`);
  });
  p.on('pageerror', (err) => note(`page error: ${err.message}`));
  p.on('requestfailed', (req) => note(`request failed: ${req.url()} ${req.failure()?.errorText}`));
}

describe('dashboard', { timeout: 300_000 }, () => {
  let b;
  let a;

  before(async () => {
    // B is the pod whose dashboard is viewed: a relay with no models of its own.
    b = await start('b', ['--profile', 'relay']);
    profileDir = mkdtempSync(join(tmpdir(), 'pod-dashboard-chromium-'));
    browser = await chromium.launchPersistentContext(profileDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1440, height: 1000 },
      timeout: 60_000,
    });
    page = await browser.newPage();
    page.setDefaultTimeout(60_000);
    watch(page, consoleErrors);
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await Promise.all(pods.map((p) => p.stop()));
    for (const p of pods) rmSync(p.home, { recursive: true, force: true });
    if (profileDir) rmSync(profileDir, { recursive: true, force: true });
  });

  it('loads with the node PeerId and no console errors', async () => {
    const res = await page.goto(b.base + '/', { waitUntil: 'load' });
    assert.equal(res.status(), 200);
    assert.match(res.headers()['content-security-policy'], /script-src 'self'/);
    await page.waitForSelector('body[data-ready="true"]');
    assert.equal(await page.textContent('#node-peer-id'), b.peerId);
    assert.match(await page.textContent('#node-info'), /relay/);
    assert.equal(await page.locator('#peers-table tbody tr[data-peer-id]').count(), 0);
    // A few polls, so that errors of the periodic refresh show too.
    await page.waitForTimeout(4500);
    assert.deepEqual(consoleErrors, []);
  });

  it('lists a second pod after it joins', async () => {
    a = await start('a', ['--model', CHAT, '--bootstrap', b.p2pAddr]);
    const row = page.locator(`#peers-table tr[data-peer-id="${a.peerId}"]`);
    await row.waitFor({ state: 'visible' });
    assert.match(await row.textContent(), new RegExp(short(a.peerId)));
    await page.locator(`#mesh-graph g.pod[data-peer-id="${a.peerId}"]`).waitFor();
    await page.locator(`#mesh-graph g.edge[data-peer-id="${a.peerId}"]`).waitFor();
  });

  it('shows a model served by a peer', async () => {
    const provider = page.locator(`#models-table tr[data-model="${CHAT}"] [data-provider="${a.peerId}"]`);
    await provider.waitFor({ state: 'visible' });
    await page.locator(`#mesh-graph g.pod[data-peer-id="${a.peerId}"] text.meta`, { hasText: CHAT }).waitFor();
    await page.locator(`#chat-model option[value="${CHAT}"]`).waitFor({ state: 'attached' });
  });

  it('streams a chat answer and names the pod that served it', async () => {
    await page.selectOption('#chat-model', CHAT);
    await page.fill('#chat-input', 'Say hello in one short sentence.');
    const deltas = [];
    await page.exposeFunction('recordDelta', (t) => deltas.push(t));
    // Count how the answer's text grows while it streams.
    await page.evaluate(() => {
      const log = document.getElementById('chat-log');
      new MutationObserver(() => {
        const text = log.querySelector('.msg.assistant .text')?.textContent;
        if (text) window.recordDelta(text);
      }).observe(log, { subtree: true, childList: true, characterData: true });
    });
    await page.click('#chat-send');
    const answer = page.locator('#chat-log .msg.assistant[data-done="true"]');
    await answer.waitFor({ timeout: 120_000 });
    const text = await answer.locator('.text').textContent();
    assert.ok(text.trim().length > 0, 'the answer has text');
    assert.ok(new Set(deltas).size > 1, `the answer arrived in pieces: ${deltas.length}`);
    assert.equal(await answer.getAttribute('data-served-by'), a.peerId);
    const meta = await answer.locator('.meta').first().textContent();
    assert.match(meta, new RegExp(`served by ${short(a.peerId)} \\(peer\\)`));
    assert.equal(await page.locator('#chat-log .msg.user').count(), 1);
    // The request shows in this node's throughput.
    await page.locator('#charts .chart .value', { hasText: /^[1-9]\d* \/min$/ }).waitFor();
    const stats = await b.get('/pod/v1/stats');
    assert.ok(stats.samples.some((s) => s.completion_tokens > 0), 'tokens counted');
    assert.ok(stats.samples.some((s) => s.requests > 0), 'request counted');
    assert.ok(stats.samples.some((s) => s.ttft_ms !== null), 'time to first token recorded');
  });

  it('shows three pods and saves a screenshot', async () => {
    const c = await start('c', ['--profile', 'storage', '--bootstrap', b.p2pAddr]);
    await page.locator(`#peers-table tr[data-peer-id="${c.peerId}"]`).waitFor({ state: 'visible' });
    await page.locator(`#mesh-graph g.pod[data-peer-id="${c.peerId}"]`).waitFor();
    // The chat's receipt, on the dashboard of A, which served it.
    const onA = await browser.newPage();
    watch(onA, consoleErrors);
    await onA.goto(a.base + '/');
    const served = onA.locator(`#receipts-table tr[data-peer-id="${b.peerId}"]`);
    await served.waitFor({ timeout: 30_000 });
    assert.match(await served.locator('td').nth(1).textContent(), /^1 req · \d+ in · [1-9]\d* out$/);
    await onA.close();
    // Round-trip times come with the next pings.
    await page.waitForFunction(() => document.querySelectorAll('#mesh-graph .rtt').length >= 2, null, { timeout: 30_000 });
    const out = join(ROOT, 'target');
    mkdirSync(out, { recursive: true });
    await page.screenshot({ path: join(out, 'dashboard.png'), fullPage: true });
    assert.deepEqual(consoleErrors, []);
  });

  it('fits a phone-sized screen', async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForTimeout(300);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than the screen`);
    assert.ok(await page.locator('#chat-input').isVisible());
    await page.screenshot({ path: join(ROOT, 'target', 'dashboard-phone.png'), fullPage: true });
    await page.setViewportSize({ width: 1440, height: 1000 });
  });

  it('asks for a key when the node has keys and refuses a wrong one', async () => {
    const d = await start('d', ['--profile', 'relay'], { key: KEY });
    const keyed = await browser.newPage();
    keyed.setDefaultTimeout(30_000);
    const errors = [];
    keyed.on('pageerror', (err) => errors.push(err.message));
    const res = await keyed.goto(d.base + '/');
    assert.equal(res.status(), 200, 'the page itself loads without a key');
    const dialog = keyed.locator('#key-dialog');
    await dialog.waitFor({ state: 'visible' });
    assert.match(await keyed.textContent('#key-message'), /requires an API key/);

    await keyed.fill('#key-input', 'sk-dashboard-wrong');
    await keyed.click('#key-form button[type="submit"]');
    await keyed.locator('#key-message', { hasText: 'refused' }).waitFor();
    assert.ok(await dialog.isVisible(), 'asked again');
    assert.equal(await keyed.evaluate(() => sessionStorage.getItem('pod.apiKey')), null, 'the wrong key is not kept');
    assert.equal(await keyed.textContent('#node-info'), '');

    await keyed.fill('#key-input', KEY);
    await keyed.click('#key-form button[type="submit"]');
    await keyed.locator('#node-peer-id', { hasText: d.peerId }).waitFor();
    assert.ok(!(await dialog.isVisible()));
    assert.equal(await keyed.evaluate(() => sessionStorage.getItem('pod.apiKey')), KEY);
    assert.ok(!keyed.url().includes(KEY), 'no key in the URL');
    // The key stays for the tab: a reload asks for nothing.
    await keyed.reload();
    await keyed.locator('#node-peer-id', { hasText: d.peerId }).waitFor();
    assert.ok(!(await dialog.isVisible()));
    assert.deepEqual(errors, []);
    await keyed.close();
  });
});
