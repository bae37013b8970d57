#!/usr/bin/env node
// Debug helper: a js-libp2p listener with the same modules as dial.mjs.
// Prints its full multiaddr (…/p2p/<PeerId>) on one line, then runs until
// SIGINT/SIGTERM.  usage: node listen.mjs [--agent STRING] [--listen MULTIADDR]
import './polyfill.mjs'
import { parseArgs } from 'node:util'
import { makeNode } from './node.mjs'

const { values } = parseArgs({
  options: {
    agent: { type: 'string', default: 'js-listener' },
    listen: { type: 'string', default: '/ip4/127.0.0.1/tcp/0' }
  }
})

const node = await makeNode({ agentVersion: values.agent, listen: [values.listen] })
await node.start()
for (const addr of node.getMultiaddrs()) process.stdout.write(`${addr}\n`)

node.addEventListener('peer:identify', (evt) => {
  process.stderr.write(`listen.mjs: identified ${evt.detail.peerId} agent=${evt.detail.agentVersion}\n`)
})

const shutdown = async () => {
  setTimeout(() => process.exit(0), 5000).unref()
  await node.stop().catch(() => {})
  process.exit(0)
}
process.once('SIGINT', shutdown)
process.once('SIGTERM', shutdown)
