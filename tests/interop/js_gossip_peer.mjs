// A js-libp2p gossip peer for tests/interop/test_js_interop.py: TCP + Noise + yamux, gossipsub
// (strict signing, message id = sha256(data) as specs/ fixes it), subscribed to one topic, on
// 127.0.0.1. It relays what it receives like any gossipsub node and reports on stdout, one JSON
// object a line: {"listening": [multiaddr...], "peer": id} once, then {"message": sha256 hex,
// "from": id, "bytes": n} per message received. Lines on stdin are multiaddrs to dial; it
// answers {"dialled": addr} or {"dial_error": addr, "error": text}. A line "publish HEX"
// publishes those bytes on the topic (signed by this peer) and answers {"published": sha256 hex,
// "recipients": n} or {"publish_error": text}. Ends on stdin EOF or after --lifetime seconds
// (default 60), whichever comes first.
import './node20_polyfills.mjs'
import { createHash } from 'node:crypto'
import { createInterface } from 'node:readline'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { gossipsub } from '@libp2p/gossipsub'
import { identify } from '@libp2p/identify'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'

const args = process.argv.slice(2)
const option = (name, fallback) => {
  const i = args.indexOf(name)
  return i >= 0 ? args[i + 1] : fallback
}
const topic = option('--topic', '/gpumarket/offers/1')
const lifetime = Number(option('--lifetime', '60'))

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const sha256 = (bytes) => createHash('sha256').update(bytes).digest()

const node = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    pubsub: gossipsub({
      globalSignaturePolicy: 'StrictSign',
      msgIdFn: (msg) => sha256(msg.data),
      heartbeatInterval: 1000,
      allowPublishToZeroTopicPeers: true
    })
  }
})

node.services.pubsub.subscribe(topic)
node.services.pubsub.addEventListener('message', (evt) => {
  const msg = evt.detail
  if (msg.topic !== topic) return
  out({ message: sha256(msg.data).toString('hex'), from: msg.from?.toString(), bytes: msg.data.length })
})

out({ listening: node.getMultiaddrs().map((a) => a.toString()), peer: node.peerId.toString() })

const stop = async (code) => {
  try { await node.stop() } catch {}
  process.exit(code)
}
const timer = setTimeout(() => stop(0), lifetime * 1000)

const lines = createInterface({ input: process.stdin })
lines.on('line', async (line) => {
  const addr = line.trim()
  if (!addr) return
  if (addr.startsWith('publish ')) {
    const data = Buffer.from(addr.slice('publish '.length), 'hex')
    try {
      const result = await node.services.pubsub.publish(topic, data)
      out({ published: sha256(data).toString('hex'), recipients: result.recipients.length })
    } catch (err) {
      out({ publish_error: String(err) })
    }
    return
  }
  try {
    await node.dial(multiaddr(addr))
    out({ dialled: addr })
  } catch (err) {
    out({ dial_error: addr, error: String(err) })
  }
})
lines.on('close', () => { clearTimeout(timer); stop(0) })
