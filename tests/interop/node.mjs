// Shared js-libp2p node construction for dial.mjs and listen.mjs:
// TCP + noise + yamux, identify (/ipfs/id/1.0.0) and ping (/ipfs/ping/1.0.0).
import './polyfill.mjs'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'

export const IDENTIFY_PROTOCOL = '/ipfs/id/1.0.0'
export const PING_PROTOCOL = '/ipfs/ping/1.0.0'

export async function makeNode ({ agentVersion, listen = [], identifyOnOpen = true } = {}) {
  return createLibp2p({
    addresses: { listen },
    nodeInfo: { userAgent: agentVersion },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    // Keep traffic deterministic: only the pings we ask for explicitly.
    connectionMonitor: { enabled: false },
    services: {
      identify: identify({ protocolPrefix: 'ipfs', runOnConnectionOpen: identifyOnOpen }),
      ping: ping({ protocolPrefix: 'ipfs' })
    }
  })
}
