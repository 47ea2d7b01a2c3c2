// Runs specs/vectors/*.json through the spec-only JavaScript implementation (impl.mjs) and prints
// per-file pass/fail counts. `--json` prints one JSON object instead (read by test_spec_js.py).
// Exit status 1 when any check fails.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { ed25519 } from '../interop/node_modules/@noble/curves/ed25519.js';
import { secp256k1 } from '../interop/node_modules/@noble/curves/secp256k1.js';
import { sha256 } from '../interop/node_modules/@noble/hashes/sha2.js';
import * as W from './impl.mjs';
import { simulateBook } from './offerbook.mjs';
import { arbiterRuling } from './arbitration.mjs';
import { query as runQuery } from './query.mjs';

const VECTORS = process.env.SPEC_VECTORS_DIR || join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'specs', 'vectors');
const load = (f) => JSON.parse(readFileSync(join(VECTORS, f), 'utf8'));
const { hex, unhex, eq, concat } = W;

const results = {}; // file -> {pass, fail, failures: [..]}
function check(file, name, fn) {
  const r = (results[file] ??= { pass: 0, fail: 0, failures: [] });
  try {
    const why = fn();
    if (why === true || why === undefined) r.pass++;
    else { r.fail++; r.failures.push(`${name}: ${why}`); }
  } catch (e) { r.fail++; r.failures.push(`${name}: threw ${e.stack?.split('\n').slice(0, 2).join(' ') ?? e}`); }
}
const same = (what, got, want) => (JSON.stringify(got) === JSON.stringify(want) ? true : `${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
const all = (...rs) => rs.find((r) => r !== true) ?? true;

// typed fields -> the vectors' JSON form (README "Conventions")
function toJson(x) {
  if (x instanceof Uint8Array) return hex(x);
  if (typeof x === 'bigint') return x <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(x) : x.toString();
  if (Array.isArray(x)) return x.map(toJson);
  if (x && typeof x === 'object') return Object.fromEntries(Object.keys(x).sort().map((k) => [k, toJson(x[k])]));
  return x;
}
const sortKeys = (x) => (Array.isArray(x) ? x.map(sortKeys) : x && typeof x === 'object'
  ? Object.fromEntries(Object.keys(x).sort().map((k) => [k, sortKeys(x[k])])) : x);
// the vectors' JSON form -> typed fields, by schema
function fromJson(kind, x) {
  switch (kind.k) {
    case 'uint': case 'amount': return BigInt(x);
    case 'bytes': case 'bytesMax': return unhex(x);
    case 'text': return x;
    case 'list': return x.map((y) => fromJson(kind.of, y));
    case 'struct': return Object.fromEntries(kind.fields.map(([n, k]) => [n, fromJson(k, x[n])]));
  }
  throw new Error('kind');
}
const msgFromJson = (type, f) => Object.fromEntries(W.MESSAGES[type].fields.map(([n, k]) => [n, fromJson(k, f[n])]));
const addressOf = (priv) => W.keccak(secp256k1.getPublicKey(unhex(priv), false).subarray(1)).subarray(12);
const code = (fn) => { try { fn(); return null; } catch (e) { if (e.code) return e.code; throw e; } };
const verdictOf = (fn) => { try { fn(); return ['accept', null]; } catch (e) { if (e instanceof W.Verdict) return [e.verdict, e.code]; throw e; } };

function checkKeys(file, keys) {
  check(file, 'keys', () => all(
    same('provider_peer_id', W.peerId(ed25519.getPublicKey(unhex(keys.provider_ed25519_seed))), keys.provider_peer_id),
    same('renter_peer_id', W.peerId(ed25519.getPublicKey(unhex(keys.renter_ed25519_seed))), keys.renter_peer_id),
    same('provider_wallet', hex(addressOf(keys.provider_wallet_private_key)), keys.provider_wallet),
    same('renter_wallet', hex(addressOf(keys.renter_wallet_private_key)), keys.renter_wallet)));
}

// ------------------------------------------------------------------ wire.json
{
  const f = 'wire.json', d = load(f);
  checkKeys(f, d.keys);
  for (const v of d.valid) {
    const wire = unhex(v.wire_hex);
    check(f, `${v.name}: decode`, () => {
      const m = W.decode(wire);
      return all(same('type', m.type, v.type), same('type_id', W.MESSAGES[m.type].id, v.type_id), same('version', m.version, v.version),
        same('fields', toJson(m.fields), sortKeys(v.fields)));
    });
    check(f, `${v.name}: decode with expected type`, () => same('type', W.decode(wire, v.type).type, v.type));
    check(f, `${v.name}: encode fields`, () => same('wire', hex(W.encode(v.type, msgFromJson(v.type, v.fields))), v.wire_hex));
    check(f, `${v.name}: sha256`, () => same('sha256', hex(sha256(wire)), v.sha256));
    if (v.domain_hex !== undefined) {
      const fields = msgFromJson(v.type, v.fields);
      check(f, `${v.name}: signing input`, () => {
        const { domain, unsigned } = W.signingBytes(v.type, fields);
        // wire.md: the unsigned bytes may also be sliced from the wire bytes
        const head = wire[0] >= 0x90 && wire[0] <= 0x9f ? new Uint8Array([wire[0] - 1]) : null;
        const sliced = head && concat(head, wire.subarray(1, wire.length - 66));
        return all(same('domain', hex(domain), v.domain_hex), same('unsigned', hex(unsigned), v.unsigned_hex),
          sliced ? same('sliced unsigned', hex(sliced), v.unsigned_hex) : true);
      });
      check(f, `${v.name}: signature verifies`, () => W.verifyMessage(v.type, fields, unhex(v.signer_public_key)) || 'does not verify');
      check(f, `${v.name}: signature fails when one bit flips`, () => {
        const bad = { ...fields, signature: Uint8Array.from(fields.signature) };
        bad.signature[5] ^= 1;
        return !W.verifyMessage(v.type, bad, unhex(v.signer_public_key)) || 'verifies';
      });
      check(f, `${v.name}: signer peer id`, () => same('peer id', W.peerId(unhex(v.signer_public_key)), v.signer_peer_id));
    }
    const binding = v.fields.binding ?? v.fields.renter_binding;
    if (binding) check(f, `${v.name}: binding verifies`, () => same('binding', code(() => W.checkBinding(fromJson(W.Binding, binding))), null));
  }
}

{
  const f = 'wire.json', d = load(f);
  for (const c of d.ed25519_edges) {
    check(f, `ed25519 edge ${c.name}`, () => same('valid', W.ed25519Verify(unhex(c.signature), unhex(c.message_hex), unhex(c.public_key)), c.valid));
  }
}

// ------------------------------------------------------------------ decoding.json
{
  const f = 'decoding.json', d = load(f);
  checkKeys(f, d.keys);
  for (const c of d.cases) check(f, c.name, () => same('code', code(() => W.decode(unhex(c.wire_hex), c.expect)), c.code));
}

// ------------------------------------------------------------------ validation.json
{
  const f = 'validation.json', d = load(f);
  checkKeys(f, d.keys);
  const params = { ...W.DEFAULT_PARAMS, ...d.params };
  for (const c of d.offers) {
    const held = { chainIds: c.chain_ids ?? null, knownSeq: c.known_seq ?? -1,
      knownDigest: c.known_digest ? unhex(c.known_digest) : null, withdrawnSeq: c.withdrawn_seq ?? -1 };
    check(f, c.name, () => same('verdict', verdictOf(() => W.validateOffer(unhex(c.wire_hex), c.now_ms, params, held)), [c.verdict, c.code]));
  }
}

{
  const f = 'validation.json', d = load(f);
  const params = { ...W.DEFAULT_PARAMS, ...d.params };
  for (const c of d.withdrawals) {
    check(f, `withdrawal ${c.name}`, () => same('verdict', verdictOf(() => W.validateWithdrawal(unhex(c.wire_hex), c.now_ms, params,
      { withdrawnSeq: c.withdrawn_seq ?? -1 })), [c.verdict, c.code]));
  }
}

// ------------------------------------------------------------------ text.json
{
  const f = 'text.json', d = load(f);
  checkKeys(f, d.keys);
  for (const c of d.cases) {
    check(f, c.name, () => {
      const wire = unhex(c.wire_hex);
      const got = code(() => {
        const m = W.decode(wire, c.message);
        if (c.message === 'Offer') {
          const [verdict, why] = verdictOf(() => W.validateOffer(wire, d.now_ms));
          if (verdict !== 'accept') throw Object.assign(new Error(), { code: `${verdict}:${why}` });
        } else if (!W.verifyMessage(c.message, m.fields, ed25519.getPublicKey(unhex(d.keys.provider_ed25519_seed)))
          && !W.verifyMessage(c.message, m.fields, ed25519.getPublicKey(unhex(d.keys.renter_ed25519_seed)))) {
          throw Object.assign(new Error(), { code: 'bad_signature' });
        }
      });
      // the codepoint is the one in the field
      return all(same('code', got, c.code), same('valid', got === null, c.valid));
    });
  }
}

// ------------------------------------------------------------------ agreement.json
{
  const f = 'agreement.json', d = load(f);
  checkKeys(f, d.keys);
  const a = d.agreement;
  const terms = fromJson(W.TermsWire, a.terms);
  check(f, 'details: decodes and re-encodes', () => {
    const det = W.decodeStruct(W.AgreementDetails, unhex(a.details_wire_hex));
    return same('re-encoded', hex(W.encodeStruct(W.AgreementDetails, det)), a.details_wire_hex);
  });
  check(f, 'details_with_image: decodes and re-encodes', () => {
    const det = W.decodeStruct(W.AgreementDetails, unhex(a.details_with_image.wire_hex));
    return all(same('re-encoded', hex(W.encodeStruct(W.AgreementDetails, det)), a.details_with_image.wire_hex),
      same('hash', hex(W.keccak(unhex(a.details_with_image.wire_hex))), a.details_with_image.details_hash));
  });
  check(f, 'details_hash', () => all(same('hash', hex(W.keccak(unhex(a.details_wire_hex))), a.details_hash),
    same('terms.details_hash', a.terms.details_hash, a.details_hash)));
  check(f, 'agreement type hash', () => same('typehash', hex(W.keccak(new TextEncoder().encode(W.AGREEMENT_TYPE))),
    '30c1acd06824275311edece1f45b41db84e7d6407ee4532d36fa5acff8bd6d7e'));
  check(f, 'agreement_id', () => same('id', hex(W.agreementId(terms)), a.agreement_id));
  const ds = W.escrowDomainSeparator(a.chain_id, unhex(a.escrow));
  check(f, 'domain_separator', () => same('ds', hex(ds), a.domain_separator));
  check(f, 'consent_digest', () => same('digest', hex(W.eip712Digest(ds, unhex(a.agreement_id))), a.consent_digest));
  check(f, 'consent_signature recovers to the provider wallet', () =>
    same('signer', hex(W.recoverWallet(unhex(a.consent_digest), unhex(a.consent_signature))), a.terms.provider));
  check(f, 'receipt digest', () => same('digest', hex(W.eip712Digest(ds, W.receiptStructHash(unhex(a.agreement_id), a.receipt.acked_seconds))), a.receipt.digest));
  check(f, 'receipt signature recovers to the renter wallet', () =>
    same('signer', hex(W.recoverWallet(unhex(a.receipt.digest), unhex(a.receipt.signature))), a.terms.renter));
  check(f, 'high-s twin of the consent is refused', () => {
    const s = unhex(a.consent_signature);
    const n = secp256k1.Point.CURVE().n;
    const hi = n - BigInt('0x' + hex(s.subarray(32, 64)));
    const twin = concat(s.subarray(0, 32), unhex(hi.toString(16).padStart(64, '0')), new Uint8Array([55 - s[64]]));
    return same('code', code(() => W.recoverWallet(unhex(a.consent_digest), twin)), 'bad_signature_high_s');
  });
}

// ------------------------------------------------------------------ binding.json
{
  const f = 'binding.json', d = load(f);
  checkKeys(f, d.keys);
  const b = d.binding, e = b.eip712;
  const te = new TextEncoder();
  check(f, 'binding struct decodes and re-encodes', () => {
    const s = W.decodeStruct(W.Binding, unhex(b.binding_wire_hex));
    return all(same('peer_key', hex(s.peer_key), b.peer_key), same('wallet', hex(s.wallet), b.wallet),
      same('chain_id', Number(s.chain_id), b.chain_id), same('wallet_sig', hex(s.wallet_sig), b.wallet_sig),
      same('peer_sig', hex(s.peer_sig), b.peer_sig), same('re-encoded', hex(W.encodeStruct(W.Binding, s)), b.binding_wire_hex));
  });
  check(f, 'eip712 domain', () => all(same('name', e.domain.name, 'gpumarket-binding'), same('version', e.domain.version, '1'),
    same('chainId', e.domain.chainId, b.chain_id),
    same('domain_typehash', hex(W.keccak(te.encode(e.domain_type))), e.domain_typehash),
    same('domain_type', e.domain_type, 'EIP712Domain(string name,string version,uint256 chainId)'),
    same('domain_separator', hex(W.bindingDomainSeparator(b.chain_id)), e.domain_separator)));
  check(f, 'eip712 struct', () => all(same('struct_type', e.struct_type, W.PEER_BINDING_TYPE),
    same('struct_typehash', hex(W.keccak(te.encode(e.struct_type))), e.struct_typehash),
    same('struct_hash', hex(W.keccak(concat(unhex(e.struct_typehash), unhex(b.peer_key)))), e.struct_hash)));
  check(f, 'eip712 digest', () => same('digest', hex(W.bindingDigest(unhex(b.peer_key), b.chain_id)), e.digest));
  check(f, 'wallet_sig recovers to wallet', () => same('signer', hex(W.recoverWallet(unhex(e.digest), unhex(b.wallet_sig))), b.wallet));
  const s = W.decodeStruct(W.Binding, unhex(b.binding_wire_hex));
  check(f, 'peer_sig payload', () => all(same('domain', hex(W.BINDING_DOMAIN), b.peer_sig_domain_hex),
    same('payload', hex(W.bindingPeerPayload(s)), b.peer_sig_payload_hex)));
  check(f, 'peer_sig verifies', () => W.ed25519Verify(unhex(b.peer_sig), unhex(b.peer_sig_domain_hex + b.peer_sig_payload_hex), unhex(b.peer_public_key)) || 'no');
  check(f, 'binding verifies', () => same('code', code(() => W.checkBinding(s)), null));
  check(f, 'binding for another chain fails', () => same('code', code(() => W.checkBinding({ ...s, chain_id: 1n })), 'binding_peer_sig'));
}

// ------------------------------------------------------------------ exec.json
{
  const f = 'exec.json', d = load(f);
  const fromDecoded = (x) => Object.fromEntries(Object.entries(x).map(([k, v]) =>
    [k, (k === 'agreement_id' || k === 'data') ? unhex(v) : v]));
  for (const v of d.valid) {
    check(f, `${v.name}: decode`, () => same('decoded', toJson(W.decodeFrame(unhex(v.payload_hex))), sortKeys(v.decoded)));
    check(f, `${v.name}: encode`, () => same('payload', hex(W.encodeFrame(fromDecoded(v.decoded))), v.payload_hex));
  }
  for (const c of d.bad_open) check(f, `bad_open ${c.name}`, () => same('code', code(() => W.decodeOpen(unhex(c.payload_hex))), c.code));
  for (const c of d.bad_forward_copy) check(f, `bad_forward_copy ${c.name}`, () => same('code', code(() => W.decodeStreamOpen(unhex(c.payload_hex))), c.code));
}

// ------------------------------------------------------------------ offerbook.json
{
  const f = 'offerbook.json', d = load(f);
  simulateBook(d, (name, fn) => check(f, name, fn), same, all);
}

// ------------------------------------------------------------------ arbitration.json
{
  const f = 'arbitration.json', d = load(f);
  for (const c of d.cases) {
    // the bundle's keys are those listed for the agreement with its notice_s
    check(f, `${c.name}: bundle decodes, keys are the listed ones`, () => {
      const b = W.decode(unhex(c.bundle_hex), 'EvidenceBundle').fields;
      const a = d.keys.agreements.find((x) => BigInt(x.notice_s) === b.details.notice_s);
      if (!a) return `no listed agreement with notice_s ${b.details.notice_s}`;
      return all(same('provider key', hex(b.details.provider_key), a.provider_ed25519_public),
        same('renter key', hex(b.details.renter_key), a.renter_ed25519_public));
    });
    check(f, `${c.name}: ruling`, () => {
      const r = arbiterRuling(unhex(c.bundle_hex));
      return all(same('notice_faults', r.notice_faults, c.notice_faults),
        same('claim_provider_amount', r.claim_provider_amount, c.claim_provider_amount),
        same('ruling', sortKeys(r.ruling), sortKeys(c.ruling)));
    });
  }
}

// ------------------------------------------------------------------ query_classes.json
{
  const f = 'query_classes.json', d = load(f);
  const entries = [], nameOf = {};
  for (const [name, o] of Object.entries(d.offers)) {
    check(f, `offer ${name}: valid at now_ms, sha256`, () => {
      const wire = unhex(o.wire_hex);
      const { offer, digest } = W.validateOffer(wire, d.now_ms);
      entries.push({ offer, digest: hex(digest) });
      nameOf[hex(digest)] = name;
      return same('sha256', hex(digest), o.sha256);
    });
  }
  for (const c of d.queries) {
    check(f, `query '${c.query}' sort ${c.sort}`, () => same('result', runQuery(entries, c.query, c.sort).map((e) => nameOf[e.digest]), c.expect));
  }
}

// ------------------------------------------------------------------ report
const failed = Object.values(results).some((r) => r.fail);
if (process.argv.includes('--json')) console.log(JSON.stringify(results));
else {
  for (const [file, r] of Object.entries(results)) {
    console.log(`${file}: ${r.pass} passed, ${r.fail} failed`);
    for (const x of r.failures) console.log(`  FAIL ${x}`);
  }
}
process.exit(failed ? 1 : 0);
