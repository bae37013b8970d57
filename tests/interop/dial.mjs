#!/usr/bin/env node
// Interop client: dial a libp2p node, identify it, ping it, print one JSON line.
//
// usage: node dial.mjs MULTIADDR [--timeout-ms N] [--hold-ms N] [--pings N]
//
// MULTIADDR must end in /p2p/<PeerId>. On success exactly one line of JSON is
// written to stdout, the connection is held open for --hold-ms (default 0),
// and the exit code is 0. On any failure, or when dial+identify+ping take
// longer than --timeout-ms (default 20000), one line goes to stderr and the
// exit code is 1.
import './polyfill.mjs'
import { parseArgs } from 'node:util'
import { multiaddr } from '@multiformats/multiaddr'
import { makeNode } from './node.mjs'

const USAGE = 'usage: node dial.mjs MULTIADDR [--timeout-ms N] [--hold-ms N] [--pings N]'
const PER_PING_TIMEOUT_MS = 5000
const STOP_TIMEOUT_MS = 5000

let finished = false

function fail (msg) {
  if (finished) return
  finished = true
  process.stderr.write(`dial.mjs: ${String(msg).split('\n')[0]}\n`)
  process.exit(1)
}

process.on('unhandledRejection', (err) => {
  if (finished) return
  fail(`unhandled rejection: ${describe(err)}`)
})

// Some libp2p internals reject with an Event rather than an Error.
function describe (err) {
  if (err instanceof Error) return err.message
  if (err instanceof Event) {
    const inner = err.error ?? err.detail
    return `${err.type} event${inner != null ? `: ${describe(inner)}` : ''}`
  }
  return String(err)
}

function intOption (values, name, dflt, min) {
  const raw = values[name]
  if (raw === undefined) return dflt
  const n = Number(raw)
  if (!Number.isInteger(n) || n < min) throw new Error(`--${name} must be an integer >= ${min}, got ${JSON.stringify(raw)}`)
  return n
}

async function main () {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      'timeout-ms': { type: 'string' },
      'hold-ms': { type: 'string' },
      pings: { type: 'string' }
    }
  })
  if (positionals.length !== 1) throw new Error(USAGE)
  const timeoutMs = intOption(values, 'timeout-ms', 20000, 1)
  const holdMs = intOption(values, 'hold-ms', 0, 0)
  const pings = intOption(values, 'pings', 3, 3)

  let target
  try {
    target = multiaddr(positionals[0])
  } catch (err) {
    throw new Error(`invalid multiaddr ${JSON.stringify(positionals[0])}: ${err.message}`)
  }
  const expectedPeer = target.getComponents().at(-1)
  if (expectedPeer?.name !== 'p2p') throw new Error(`multiaddr must end in /p2p/<PeerId>: ${target}`)

  // Every libp2p call below gets this signal; the timer is a backstop in case
  // something does not honour it.
  const deadline = AbortSignal.timeout(timeoutMs)
  const backstop = setTimeout(() => fail(`timed out after ${timeoutMs} ms`), timeoutMs + 1000)

  const step = async (what, fn) => {
    try {
      return await fn()
    } catch (err) {
      if (deadline.aborted) throw new Error(`timed out after ${timeoutMs} ms during ${what}`)
      throw new Error(`${what} failed: ${describe(err)}`)
    }
  }

  // identify is run explicitly (not on connection open) so that its errors
  // surface here and its completion is awaited deterministically.
  const node = await step('start', () => makeNode({ agentVersion: 'pod-interop-js', identifyOnOpen: false }))
  await step('start', () => node.start())

  const conn = await step('dial', () => node.dial(target, { signal: deadline }))
  const remotePeer = conn.remotePeer
  if (remotePeer.toString() !== expectedPeer.value) {
    throw new Error(`connected to ${remotePeer} but expected ${expectedPeer.value}`)
  }

  const id = await step('identify', () => node.services.identify.identify(conn, { signal: deadline }))

  const pingMs = []
  for (let i = 1; i <= pings; i++) {
    const signal = AbortSignal.any([deadline, AbortSignal.timeout(PER_PING_TIMEOUT_MS)])
    pingMs.push(await step(`ping ${i}/${pings}`, () => node.services.ping.ping(remotePeer, { signal })))
  }
  // Pings redial transparently, so make sure they ran on the original
  // connection: a remote that drops idle connections right away should fail.
  if (conn.status !== 'open') {
    throw new Error(`connection to ${remotePeer} was closed (status ${conn.status}) before identify+pings finished; does the remote drop idle connections?`)
  }
  clearTimeout(backstop)

  process.stdout.write(JSON.stringify({
    peer_id: remotePeer.toString(),
    agent_version: id.agentVersion ?? null,
    protocol_version: id.protocolVersion ?? null,
    protocols: [...id.protocols],
    listen_addrs: id.listenAddrs.map((a) => a.toString()),
    ping_ms: pingMs,
    local_peer_id: node.peerId.toString()
  }) + '\n')

  if (holdMs > 0) {
    const onClose = (evt) => {
      if (evt.detail.remotePeer.equals(remotePeer)) {
        process.stderr.write(`dial.mjs: note: connection to ${remotePeer} closed during hold\n`)
      }
    }
    node.addEventListener('connection:close', onClose)
    await new Promise((resolve) => setTimeout(resolve, holdMs))
    node.removeEventListener('connection:close', onClose)
  }

  finished = true
  setTimeout(() => process.exit(0), STOP_TIMEOUT_MS).unref()
  await node.stop().catch(() => {})
  process.exit(0)
}

main().catch((err) => fail(describe(err)))
