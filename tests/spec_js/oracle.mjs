// Answers batches of questions with the spec-only implementation, for differential tests against
// protocol/ (tests/spec_js/test_spec_js.py): reads a JSON array from stdin, writes one answer per
// item. Items: {op: "decode", hex, expect} -> error code or null; {op: "offer", hex, now_ms,
// known_seq?, known_digest?, withdrawn_seq?, chain_ids?} -> "accept" or "verdict:code";
// {op: "ed25519", key, msg, sig} -> boolean; {op: "recover", digest, sig} -> address or code;
// {op: "query", offers: [{hex, score}], now_ms, queries: [{query, sort, limit}]} -> per query a
// list of sha256 hex or "bad_query"; {op: "ruling", hex} -> {claim_provider_amount, notice_faults,
// ruling} (specs/evidence.md) or an error code.
import { readFileSync } from 'node:fs';
import * as W from './impl.mjs';
import { query as runQuery } from './query.mjs';
import { arbiterRuling } from './arbitration.mjs';

const items = JSON.parse(readFileSync(0, 'utf8'));
const codeOf = (fn) => { try { return fn(); } catch (e) { if (e.code) return { code: e.code }; throw e; } };
const out = items.map((it) => {
  switch (it.op) {
    case 'decode': { const r = codeOf(() => W.decode(W.unhex(it.hex), it.expect ?? null)); return r.code ?? null; }
    case 'offer': {
      try {
        W.validateOffer(W.unhex(it.hex), it.now_ms, W.DEFAULT_PARAMS, {
          knownSeq: it.known_seq ?? -1, knownDigest: it.known_digest ? W.unhex(it.known_digest) : null,
          withdrawnSeq: it.withdrawn_seq ?? -1, chainIds: it.chain_ids ?? null });
        return 'accept';
      } catch (e) { if (e instanceof W.Verdict) return `${e.verdict}:${e.code}`; throw e; }
    }
    case 'ed25519': return W.ed25519Verify(W.unhex(it.sig), W.unhex(it.msg), W.unhex(it.key));
    case 'query': {
      const entries = it.offers.map((x) => { const { offer, digest } = W.validateOffer(W.unhex(x.hex), it.now_ms); return { offer, digest: W.hex(digest), score: x.score }; });
      return it.queries.map((q) => {
        try { return runQuery(entries, q.query, q.sort, q.limit ?? null).map((e) => e.digest); } catch (e) { if (e.code === 'bad_query') return 'bad_query'; throw e; }
      });
    }
    case 'ruling': { const r = codeOf(() => arbiterRuling(W.unhex(it.hex))); return r.code ?? r; }
    case 'recover': { const r = codeOf(() => W.hex(W.recoverWallet(W.unhex(it.digest), W.unhex(it.sig)))); return typeof r === 'string' ? r : r.code; }
  }
  throw new Error(`unknown op ${it.op}`);
});
process.stdout.write(JSON.stringify(out));
