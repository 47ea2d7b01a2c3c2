// The evidence bundle's notice faults and the arbiter's ruling (specs/evidence.md, steps 1, 3, 4,
// 5 and 8 and "Arbitration"; specs/settlement.md), from the spec only. Steps 2, 6 and 7 do not
// change the ruling and are not modelled here.
import { sha256 } from '../interop/node_modules/@noble/hashes/sha2.js';
import * as W from './impl.mjs';

const { hex, eq } = W;
const ZERO32 = new Uint8Array(32);
const TOL_MS = 5000; // heartbeat_late_tolerance_ms (specs/parameters.md)
const SKEW_MS = 30000; // clock_skew_ms

class LocalError extends Error { constructor(code) { super(code); this.code = code; } }

// decode + agreement id + signature; returns the fields or null (listed invalid in the verdict)
function message(type, bytes, agreementId, key) {
  let m;
  try { m = W.decode(bytes, type); } catch (e) { if (e instanceof W.WireError) return null; throw e; }
  const f = m.fields;
  if (!eq(f.agreement_id, agreementId)) return null;
  if (!W.verifyMessage(type, f, key)) return null;
  return f;
}

// The parts of verify_bundle the ruling reads: acked_seconds and notice_faults (plus the notice).
export function noticeVerdict(bundleBytes) {
  const b = W.decode(bundleBytes, 'EvidenceBundle').fields;
  const { terms, details } = b;
  // step 1 (fatal): valid terms, then the details they commit to
  const isZero = (a) => a.every((x) => x === 0);
  const t = terms;
  const termsOk = !isZero(t.provider) && !isZero(t.renter) && !eq(t.provider, t.renter) && t.price_per_second > 0n
    && t.max_seconds > 0n && t.price_per_second * t.max_seconds < (1n << 256n) && t.heartbeat_interval > 0n
    && isZero(t.arbiter) === (t.dispute_window === 0n)
    && (isZero(t.arbiter) || (!eq(t.arbiter, t.provider) && !eq(t.arbiter, t.renter))) && t.open_by > 0n;
  if (!termsOk) throw new LocalError('bad_terms');
  if (!eq(W.keccak(W.encodeStruct(W.AgreementDetails, details)), terms.details_hash)) throw new LocalError('bad_terms');
  const id = W.agreementId(terms);
  const I = Number(terms.heartbeat_interval);
  const startedMs = Number(b.started_s) * 1000;

  // step 3: heartbeats
  const agreed = details.gpus.map(hex).sort().join();
  const hbs = [];
  for (const bytes of b.heartbeats) {
    const f = message('Heartbeat', bytes, id, details.provider_key);
    if (!f) continue;
    if (f.metrics.map((x) => hex(x.uuid_digest)).sort().join() !== agreed) continue;
    hbs.push({ seq: Number(f.seq), sent_ms: Number(f.sent_ms), prev: hex(f.prev_hash), hash: hex(sha256(bytes)) });
  }
  // one seq, several valid heartbeats: keep the one the next seq links to, else the first in
  // bundle order (the others are equivocation)
  const bySeq = new Map();
  for (const h of hbs) (bySeq.get(h.seq) ?? bySeq.set(h.seq, []).get(h.seq)).push(h);
  const kept = new Map();
  for (const [seq, group] of bySeq) {
    const next = (bySeq.get(seq + 1) ?? []).map((n) => n.prev);
    kept.set(seq, group.find((h) => next.includes(h.hash)) ?? group[0]);
  }
  // in seq order: a link to the kept k-1 (valid or not), time against the last that passed
  const valid = [];
  for (const h of [...kept.values()].sort((x, y) => x.seq - y.seq)) {
    const prev = kept.get(h.seq - 1);
    if (h.seq === 0 && h.prev !== hex(ZERO32)) continue; // broken_chain
    if (prev && h.prev !== prev.hash) continue; // broken_chain
    if (valid.length && h.sent_ms < valid[valid.length - 1].sent_ms) continue; // time_went_back
    if (h.sent_ms < startedMs - SKEW_MS) continue; // before_start
    valid.push(h);
  }

  // step 4: receipts
  const ds = W.escrowDomainSeparator(details.chain_id, details.escrow);
  const receipts = [];
  for (const bytes of b.receipts) {
    const f = message('UsageReceipt', bytes, id, details.renter_key);
    if (!f) continue;
    if (f.acked_seconds > terms.max_seconds) continue;
    let signer;
    try { signer = W.recoverWallet(W.eip712Digest(ds, W.receiptStructHash(id, f.acked_seconds)), f.wallet_sig); } catch { continue; }
    if (!eq(signer, terms.renter)) continue;
    receipts.push({ acked: f.acked_seconds, seq: Number(f.heartbeat_seq), hash: hex(f.heartbeat_hash) });
  }
  // step 5
  const acked = receipts.reduce((a, r) => (r.acked > a ? r.acked : a), 0n);

  // step 8: notices; the binding one has the earliest (stop_ms, sent_ms, bytes)
  const notices = [];
  for (const bytes of b.notices) {
    const f = message('PreemptionNotice', bytes, id, details.provider_key);
    if (!f || f.stop_ms < f.sent_ms) continue;
    notices.push({ f, key: [Number(f.stop_ms), Number(f.sent_ms), hex(bytes)] });
  }
  notices.sort((x, y) => { for (let i = 0; i < 3; i++) { if (x.key[i] < y.key[i]) return -1; if (x.key[i] > y.key[i]) return 1; } return 0; });
  const faults = [];
  const n = notices[0]?.f ?? null;
  const noticeS = Number(details.notice_s);
  if (n) {
    const stop = Number(n.stop_ms), sent = Number(n.sent_ms);
    if (noticeS === 0) faults.push('notice_on_demand');
    if (stop - sent < noticeS * 1000) faults.push('short_notice');
    const after = valid.find((h) => h.hash === hex(n.after_heartbeat));
    if (after && after.sent_ms > sent) faults.push('notice_backdated');
    const lastHb = valid[valid.length - 1];
    const answered = lastHb && receipts.some((r) => r.seq === lastHb.seq && r.hash === lastHb.hash);
    const promisedEnd = Math.min(stop, startedMs + Number(terms.max_seconds) * 1000);
    if (answered && promisedEnd - lastHb.sent_ms > I * 1000 + TOL_MS) faults.push('stopped_early');
  }
  return { agreement_id: hex(id), acked_seconds: acked, notice: n, notice_faults: faults, terms, details, started_s: Number(b.started_s) };
}

const ceilDiv = (a, b) => (a + b - 1n) / b;

export function arbiterRuling(bundleBytes) {
  const v = noticeVerdict(bundleBytes);
  const { terms, details } = v;
  const price = terms.price_per_second, acked = v.acked_seconds;
  const faults = new Set(v.notice_faults);
  let forfeit = 0n;
  if (faults.has('notice_on_demand')) {
    const endMs = (BigInt(v.started_s) + terms.max_seconds) * 1000n;
    const cut = endMs - v.notice.stop_ms;
    const f = ceilDiv(cut > 0n ? cut : 0n, 1000n);
    if (f > forfeit) forfeit = f;
  }
  if (['short_notice', 'notice_backdated', 'stopped_early'].some((x) => faults.has(x)) && details.notice_s > forfeit) forfeit = details.notice_s;
  const paid = acked > forfeit ? acked - forfeit : 0n;
  const provider = price * paid;
  const deposit = price * terms.max_seconds;
  return {
    claim_provider_amount: (price * acked).toString(),
    notice_faults: v.notice_faults,
    ruling: {
      acked_seconds: Number(acked), agreement_id: v.agreement_id, faults: v.notice_faults,
      forfeit_seconds: Number(forfeit < acked ? forfeit : acked), paid_seconds: Number(paid),
      provider_amount: provider.toString(), renter_amount: (deposit - provider).toString(),
    },
  };
}
