// Real `pod` processes on 127.0.0.1 for the dashboard test: each with its own state directory
// (identity) and API port, sharing the verified models of ~/.cache/pod, off mDNS.

import { spawn } from 'node:child_process';
import { mkdtempSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { homedir, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CHAT = 'smollm2-135m-instruct';

const podBinary = () => process.env.POD_BIN || join(ROOT, 'target', 'debug', 'pod');
const modelsDir = () => join(process.env.POD_HOME || join(homedir(), '.cache', 'pod'), 'models');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.once('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

/** A running `pod start`. */
export class Pod {
  /** Starts a pod with `args` after the common ones; resolves once `/health` answers 200. */
  static async start(name, args, { key } = {}) {
    const pod = new Pod(name, await freePort(), key);
    const extra = [...args];
    if (key) {
      const file = join(pod.home, 'keys');
      writeFileSync(file, `${key}\n`, { mode: 0o600 });
      extra.push('--api-key-file', file);
    }
    pod.spawn(extra);
    await pod.waitReady(120_000);
    const node = await pod.get('/pod/v1/node');
    pod.peerId = node.peer_id;
    pod.p2pAddr = `${node.listen_addrs[0]}/p2p/${node.peer_id}`;
    return pod;
  }

  constructor(name, port, key) {
    this.name = name;
    this.port = port;
    this.key = key;
    this.base = `http://127.0.0.1:${port}`;
    this.home = mkdtempSync(join(tmpdir(), `pod-dashboard-${name}-`));
    this.log = join(this.home, 'pod.log');
  }

  spawn(extra) {
    const out = openSync(this.log, 'a');
    const args = [
      '--home', this.home, '--models-dir', modelsDir(),
      'start', '--api-port', String(this.port),
      '--listen', '/ip4/127.0.0.1/tcp/0', '--no-mdns', '--announce-interval', '1',
      ...extra,
    ];
    this.proc = spawn(podBinary(), args, { stdio: ['ignore', out, out] });
    this.exited = new Promise((r) => this.proc.once('exit', (code, signal) => r(code ?? signal)));
  }

  async waitReady(timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) throw new Error(`pod ${this.name} exited:\n${this.output()}`);
      try {
        const r = await fetch(`${this.base}/health`, { signal: AbortSignal.timeout(2000) });
        if (r.status === 200) return;
      } catch {
        // not listening yet
      }
      await sleep(200);
    }
    throw new Error(`pod ${this.name} not ready after ${timeoutMs} ms:\n${this.output()}`);
  }

  /** GETs JSON from the pod's API (with its key, if it has one). */
  async get(path) {
    const headers = this.key ? { Authorization: `Bearer ${this.key}` } : {};
    const r = await fetch(this.base + path, { headers, signal: AbortSignal.timeout(10_000) });
    if (!r.ok) throw new Error(`${this.name} ${path}: HTTP ${r.status}`);
    return r.json();
  }

  output() {
    try {
      return readFileSync(this.log, 'utf8').split('\n').slice(-40).join('\n');
    } catch {
      return '';
    }
  }

  /** SIGTERM, then SIGKILL after `timeoutMs`. */
  async stop(timeoutMs = 20_000) {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill('SIGTERM');
    const done = await Promise.race([this.exited.then(() => true), sleep(timeoutMs).then(() => false)]);
    if (!done) {
      this.proc.kill('SIGKILL');
      await Promise.race([this.exited, sleep(10_000)]);
    }
  }
}
