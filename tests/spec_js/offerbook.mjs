// The offer book's admission, eviction and ranking rules (specs/offerbook.md), from the spec only,
// replayed against specs/vectors/offerbook.json.
import * as W from './impl.mjs';

const cmp = (a, b) => { // lexicographic over arrays of numbers / BigInts / hex strings
  for (let i = 0; i < a.length; i++) { if (a[i] < b[i]) return -1; if (a[i] > b[i]) return 1; }
  return 0;
};

export function simulateBook(d, check, same, all) {
  const p = { ...W.DEFAULT_PARAMS, ...d.params };
  const scoreOf = (provider) => d.scores[provider] ?? d.unknown_score;
  const book = new Map(); // provider hex -> entry
  let bytes = 0;
  const provenWallets = new Set(d.proven_wallets);
  // 1 iff e is its wallet's one proven offer among `held` (plus e): the wallet is proven and no
  // other held offer of that wallet has a smaller (since_ms, provider key)
  const provenFlag = (e, held) => {
    if (!provenWallets.has(e.wallet)) return 0;
    for (const o of held.values())
      if (o.provider !== e.provider && o.wallet === e.wallet && cmp([o.since_ms, o.provider], [e.since_ms, e.provider]) < 0) return 0;
    return 1;
  };
  // keep order, weakest first: (score, proven, -since_ms, expires_ms, digest)
  const keepKey = (e) => [e.score, provenFlag(e, book), -e.since_ms, e.expires_ms, e.digest];
  const expire = (now) => {
    for (const [k, e] of book) if (now > e.expires_ms + p.clock_skew_ms) { book.delete(k); bytes -= e.size; }
  };
  for (const [i, s] of d.steps.entries()) {
    check(`step ${i} (${s.provider.slice(0, 8)})`, () => {
      expire(s.now_ms);
      const wire = W.unhex(s.wire_hex);
      const held = book.get(s.provider);
      let verdict = 'accept', evicted = [], res;
      try {
        res = W.validateOffer(wire, s.now_ms, p, held ? { knownSeq: held.seq, knownDigest: W.unhex(held.digest) } : {});
      } catch (e) { if (!(e instanceof W.Verdict)) throw e; verdict = `${e.verdict}:${e.code}`; }
      if (verdict === 'accept') {
        const o = res.offer;
        const entry = { provider: s.provider, digest: W.hex(res.digest), seq: Number(o.seq), size: wire.length,
          since_ms: held ? held.since_ms : s.now_ms, expires_ms: Number(o.expires_ms), score: scoreOf(s.provider),
          wallet: W.hex(o.binding.wallet), offer: o };
        const needSlot = !held && book.size >= p.book_max_providers ? 1 : 0;
        const needBytes = bytes - (held ? held.size : 0) + entry.size - p.book_max_bytes;
        if (entry.size > p.book_max_bytes) verdict = 'ignore:book_full';
        else if (needSlot || needBytes > 0) {
          const others = [...book.values()].filter((e) => e.provider !== s.provider).sort((a, b) => cmp(keepKey(a), keepKey(b)));
          const arriving = keepKey(entry).slice(0, 4); // the held keys are those before arrival
          let slots = 0, freed = 0;
          const take = [];
          for (const e of others) {
            if (slots >= needSlot && freed >= needBytes) break;
            take.push(e); slots++; freed += e.size;
          }
          const enough = slots >= needSlot && freed >= needBytes;
          if (!enough || take.some((e) => cmp(keepKey(e).slice(0, 4), arriving) >= 0)) verdict = 'ignore:book_full';
          else for (const e of take) { book.delete(e.provider); bytes -= e.size; evicted.push(e.provider); }
        }
        if (verdict === 'accept') {
          if (held) bytes -= held.size;
          book.set(s.provider, entry); bytes += entry.size;
        }
      }
      return all(same('verdict', verdict, s.verdict), same('evicted', evicted, s.evicted), same('bytes', bytes, s.book_bytes_after),
        same('size', wire.length, s.size));
    });
  }
  check('held offers', () => same('held',
    [...book.values()].sort((a, b) => cmp([a.provider], [b.provider])).map((e) => ({ digest: e.digest, provider: e.provider, seq: e.seq, since_ms: e.since_ms, wallet: e.wallet })),
    [...d.held].sort((a, b) => cmp([a.provider], [b.provider]))));
  const price = (e) => e.offer.terms.price_per_gpu_second * 3600n * 10n ** (36n - e.offer.terms.token_decimals);
  check('price order', () => {
    if (d.price.query !== '') return `query ${d.price.query} not supported here`;
    const order = [...book.values()].sort((a, b) => cmp([price(a), a.digest], [price(b), b.digest])).map((e) => e.provider);
    return same('order', order, d.price.order);
  });
  check('rank order', () => {
    if (d.rank.query !== '') return `query ${d.rank.query} not supported here`;
    const now = d.rank.now_ms;
    const proven = new Set(d.proven_wallets);
    const provenOffer = new Map(); // wallet -> provider of its one proven offer
    for (const e of [...book.values()].sort((a, b) => cmp([a.since_ms, a.provider], [b.since_ms, b.provider])))
      if (proven.has(e.wallet) && !provenOffer.has(e.wallet)) provenOffer.set(e.wallet, e.provider);
    const tier = (e) => {
      if (e.score > 0.5) return 0;
      if (e.score < 0.5) return 4;
      if (provenOffer.get(e.wallet) === e.provider) return 1;
      return e.since_ms <= now - p.book_established_ms ? 2 : 3;
    };
    const order = [...book.values()].sort((a, b) => cmp([tier(a), price(a), a.digest], [tier(b), price(b), b.digest])).map((e) => e.provider);
    return same('order', order, d.rank.order);
  });
}
