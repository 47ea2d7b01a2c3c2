// js-libp2p 3.x targets Node >= 22; Node 20 (Debian's, and this machine's) lacks
// Promise.withResolvers, which it-queue calls. Imported first by js_gossip_peer.mjs.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
