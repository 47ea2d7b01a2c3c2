// A second implementation of the gpumarket wire protocol, written from specs/ only
// (specs/wire.md, specs/validation.md, specs/parameters.md, specs/escrow.md,
// specs/runtime.md section 2, specs/offerbook.md; the query language in query.mjs, the arbiter's
// ruling in arbitration.mjs). It exists to find where the spec is not exact enough for an
// implementer who never reads protocol/.
import { ed25519 } from '../interop/node_modules/@noble/curves/ed25519.js';
import { secp256k1 } from '../interop/node_modules/@noble/curves/secp256k1.js';
import { sha256, sha512 } from '../interop/node_modules/@noble/hashes/sha2.js';
import { keccak_256 } from '../interop/node_modules/@noble/hashes/sha3.js';

// ---------------------------------------------------------------- bytes helpers
export const hex = (b) => Buffer.from(b).toString('hex');
export const unhex = (s) => new Uint8Array(Buffer.from(s, 'hex'));
export const concat = (...parts) => {
  const n = parts.reduce((a, p) => a + p.length, 0);
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
};
export const eq = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
const ascii = (s) => new TextEncoder().encode(s);
const beBytes = (v, n) => { // BigInt -> n bytes big-endian
  const out = new Uint8Array(n);
  for (let i = n - 1; i >= 0; i--) { out[i] = Number(v & 0xffn); v >>= 8n; }
  return out;
};
const beInt = (b) => b.reduce((a, x) => (a << 8n) | BigInt(x), 0n);

export class WireError extends Error {
  constructor(code, detail) { super(`${code}: ${detail ?? ''}`); this.code = code; }
}

// ---------------------------------------------------------------- msgpack parsing (wire.md step 2)
// Values: {t:'int', v:BigInt} {t:'str', v:string} {t:'bin', v:Uint8Array} {t:'arr', v:[...]}
// {t:'map', v:[[k,v]...]} {t:'float'} {t:'nil'} {t:'bool', v} {t:'ext', type, data}
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const MAX_DEPTH = 1024;

export function parseOne(buf) {
  const n = buf.length;
  let pos = 0;
  let tainted = false; // float, map or ext anywhere
  const need = (k) => { if (pos + k > n) throw new WireError('truncated', 'input ends inside a value'); };
  const u = (k) => { need(k); const v = beInt(buf.subarray(pos, pos + k)); pos += k; return v; };
  const lenGuard = (len) => { if (len > n - pos) throw new WireError('truncated', 'length beyond input'); };
  const raw = (len) => { lenGuard(len); const b = buf.subarray(pos, pos + len); pos += len; return b; };
  const str = (len) => {
    const b = raw(len);
    try { return { t: 'str', v: utf8.decode(b) }; } catch { throw new WireError('malformed', 'invalid utf-8'); }
  };
  const ext = (len) => {
    // header (and type byte) read; len data bytes follow
    lenGuard(len);
    const type = u(1);
    const signed = type >= 128n ? type - 256n : type;
    const data = raw(len);
    if (signed === -1n) {
      if (len === 4) { /* seconds only */ }
      else if (len === 8) { if ((beInt(data) >> 34n) > 999999999n) throw new WireError('malformed', 'timestamp ns'); }
      else if (len === 12) { if (beInt(data.subarray(0, 4)) > 999999999n) throw new WireError('malformed', 'timestamp ns'); }
      else throw new WireError('malformed', 'timestamp length');
    }
    tainted = true;
    return { t: 'ext', type: signed, data };
  };
  const arr = (count, depth) => {
    if (depth > MAX_DEPTH) throw new WireError('malformed', 'nesting');
    if (count > n) throw new WireError('truncated', 'array count over input length');
    const v = [];
    for (let i = 0; i < count; i++) v.push(value(depth));
    return { t: 'arr', v };
  };
  const map = (count, depth) => {
    if (depth > MAX_DEPTH) throw new WireError('malformed', 'nesting');
    if (count > Math.floor(n / 2)) throw new WireError('truncated', 'map count over half input length');
    tainted = true;
    const v = [];
    for (let i = 0; i < count; i++) v.push([value(depth), value(depth)]);
    return { t: 'map', v };
  };
  const value = (depth) => {
    need(1);
    const b = buf[pos++];
    if (b <= 0x7f) return { t: 'int', v: BigInt(b) };
    if (b >= 0xe0) return { t: 'int', v: BigInt(b - 256) };
    if (b >= 0x80 && b <= 0x8f) return map(b & 0x0f, depth + 1);
    if (b >= 0x90 && b <= 0x9f) return arr(b & 0x0f, depth + 1);
    if (b >= 0xa0 && b <= 0xbf) return str(b & 0x1f);
    switch (b) {
      case 0xc0: return { t: 'nil' };
      case 0xc1: throw new WireError('malformed', 'byte 0xc1');
      case 0xc2: return { t: 'bool', v: false };
      case 0xc3: return { t: 'bool', v: true };
      case 0xc4: return { t: 'bin', v: raw(Number(u(1))) };
      case 0xc5: return { t: 'bin', v: raw(Number(u(2))) };
      case 0xc6: return { t: 'bin', v: raw(Number(u(4))) };
      case 0xc7: return ext(Number(u(1)));
      case 0xc8: return ext(Number(u(2)));
      case 0xc9: return ext(Number(u(4)));
      case 0xca: u(4); tainted = true; return { t: 'float' };
      case 0xcb: u(8); tainted = true; return { t: 'float' };
      case 0xcc: return { t: 'int', v: u(1) };
      case 0xcd: return { t: 'int', v: u(2) };
      case 0xce: return { t: 'int', v: u(4) };
      case 0xcf: return { t: 'int', v: u(8) };
      case 0xd0: { const x = u(1); return { t: 'int', v: x >= 0x80n ? x - 0x100n : x }; }
      case 0xd1: { const x = u(2); return { t: 'int', v: x >= 0x8000n ? x - 0x10000n : x }; }
      case 0xd2: { const x = u(4); return { t: 'int', v: x >= 0x80000000n ? x - 0x100000000n : x }; }
      case 0xd3: { const x = u(8); return { t: 'int', v: x >= (1n << 63n) ? x - (1n << 64n) : x }; }
      case 0xd4: return ext(1);
      case 0xd5: return ext(2);
      case 0xd6: return ext(4);
      case 0xd7: return ext(8);
      case 0xd8: return ext(16);
      case 0xd9: return str(Number(u(1)));
      case 0xda: return str(Number(u(2)));
      case 0xdb: return str(Number(u(4)));
      case 0xdc: return arr(Number(u(2)), depth + 1);
      case 0xdd: return arr(Number(u(4)), depth + 1);
      case 0xde: return map(Number(u(2)), depth + 1);
      case 0xdf: return map(Number(u(4)), depth + 1);
    }
    throw new Error('unreachable');
  };
  if (n === 0) throw new WireError('truncated', 'empty');
  const v = value(0);
  return { value: v, end: pos, tainted };
}

// ---------------------------------------------------------------- canonical packing
function packHead(fix, fixMax, codes, len) {
  if (fix !== null && len <= fixMax) return [fix | len];
  if (codes[0] !== null && len < 0x100) return [codes[0], len];
  if (len < 0x10000) return [codes[1], len >> 8, len & 0xff];
  return [codes[2], (len >>> 24) & 0xff, (len >> 16) & 0xff, (len >> 8) & 0xff, len & 0xff];
}
export function pack(v) {
  const out = [];
  const w = (x) => {
    switch (x.t) {
      case 'int': {
        const i = x.v;
        if (i >= 0n) {
          if (i < 0x80n) out.push(Number(i));
          else if (i < 0x100n) out.push(0xcc, Number(i));
          else if (i < 0x10000n) out.push(0xcd, ...beBytes(i, 2));
          else if (i < 0x100000000n) out.push(0xce, ...beBytes(i, 4));
          else out.push(0xcf, ...beBytes(i, 8));
        } else {
          if (i >= -32n) out.push(Number(i + 256n));
          else if (i >= -0x80n) out.push(0xd0, Number(i + 0x100n));
          else if (i >= -0x8000n) out.push(0xd1, ...beBytes(i + 0x10000n, 2));
          else if (i >= -0x80000000n) out.push(0xd2, ...beBytes(i + 0x100000000n, 4));
          else out.push(0xd3, ...beBytes(i + (1n << 64n), 8));
        }
        break;
      }
      case 'str': { const b = new TextEncoder().encode(x.v); out.push(...packHead(0xa0, 31, [0xd9, 0xda, 0xdb], b.length), ...b); break; }
      case 'bin': out.push(...packHead(null, -1, [0xc4, 0xc5, 0xc6], x.v.length), ...x.v); break;
      case 'arr': out.push(...packHead(0x90, 15, [null, 0xdc, 0xdd], x.v.length)); x.v.forEach(w); break;
      case 'nil': out.push(0xc0); break;
      case 'bool': out.push(x.v ? 0xc3 : 0xc2); break;
      default: throw new Error(`cannot pack ${x.t}`);
    }
  };
  w(v);
  return new Uint8Array(out);
}

// ---------------------------------------------------------------- schema (wire.md)
const K = {
  uint: (bits) => ({ k: 'uint', max: (1n << BigInt(bits)) - 1n }),
  u53: { k: 'uint', max: (1n << 53n) - 1n },
  amount: { k: 'amount' },
  bytes: (n) => ({ k: 'bytes', n }),
  bytesMax: (n) => ({ k: 'bytesMax', n }),
  text: (n) => ({ k: 'text', n }),
  list: (of, n) => ({ k: 'list', of, n }),
  struct: (name, fields) => ({ k: 'struct', name, fields }),
};
const u8 = K.uint(8), u16 = K.uint(16), u32 = K.uint(32), u53 = K.u53;
const b16 = K.bytes(16), b20 = K.bytes(20), b32 = K.bytes(32), b64 = K.bytes(64), b65 = K.bytes(65);

export const GpuInfo = K.struct('GpuInfo', [['model', K.text(64)], ['uuid_digest', b32], ['vram_mib', u32],
  ['cc_major', u8], ['cc_minor', u8], ['driver_version', K.text(32)], ['cuda_version', u32], ['pcie_gen', u8],
  ['pcie_width', u8], ['power_limit_w', u16]]);
export const HostInfo = K.struct('HostInfo', [['cpu_cores', u16], ['ram_mib', u32], ['disk_gib', u32],
  ['bandwidth_mbps', u32], ['region', K.text(32)]]);
export const OfferTerms = K.struct('OfferTerms', [['chain_id', u53], ['token', b20], ['token_symbol', K.text(12)],
  ['token_decimals', u8], ['price_per_gpu_second', K.amount], ['escrow', b20], ['min_duration_s', u32],
  ['max_duration_s', u32], ['heartbeat_interval_s', u32], ['grace_s', u32], ['arbiter', b20], ['dispute_window_s', u32]]);
export const Binding = K.struct('Binding', [['peer_key', b32], ['wallet', b20], ['chain_id', u53], ['wallet_sig', b65], ['peer_sig', b64]]);
export const GpuMetrics = K.struct('GpuMetrics', [['uuid_digest', b32], ['util_pct', u8], ['mem_used_mib', u32], ['temp_c', u8], ['power_mw', u32]]);
export const TermsWire = K.struct('TermsWire', [['provider', b20], ['renter', b20], ['token', b20], ['price_per_second', K.amount],
  ['max_seconds', u53], ['heartbeat_interval', u32], ['grace', u32], ['arbiter', b20], ['dispute_window', u32],
  ['details_hash', b32], ['open_by', u53]]);
export const AgreementDetails = K.struct('AgreementDetails', [['negotiation_id', b16], ['offer_digest', b32], ['provider_key', b32],
  ['renter_key', b32], ['chain_id', u53], ['escrow', b20], ['gpus', K.list(b32, 64)], ['access_key', K.text(1024)],
  ['notice_s', u32], ['image', K.text(128)]]);
export const InterruptibleGpus = K.struct('InterruptibleGpus', [['gpus', K.list(b32, 64)], ['notice_s', u32], ['price_per_gpu_second', K.amount]]);

const sig = ['signature', b64];
export const MESSAGES = {
  Offer: { id: 1, max: 16 * 1024, domain: 'gpumarket/offer/v1\0', fields: [['provider', b32], ['seq', u53], ['created_ms', u53],
    ['expires_ms', u53], ['gpus', K.list(GpuInfo, 64)], ['host', HostInfo], ['terms', OfferTerms], ['binding', Binding],
    ['addrs', K.list(K.text(256), 4)], ['images', K.list(K.text(128), 8)], ['interruptible', K.list(InterruptibleGpus, 8)], sig] },
  OfferWithdrawal: { id: 2, max: 256, domain: 'gpumarket/withdrawal/v1\0', fields: [['provider', b32], ['seq', u53], ['created_ms', u53], sig] },
  Proposal: { id: 10, max: 4096, domain: 'gpumarket/proposal/v1\0', fields: [['negotiation_id', b16], ['round', u8], ['offer_digest', b32],
    ['provider', b32], ['renter', b32], ['renter_binding', Binding], ['gpu_count', u8], ['duration_s', u32],
    ['price_per_gpu_second', K.amount], ['access_key', K.text(1024)], ['sent_ms', u53], ['notice_s', u32], ['image', K.text(128)], sig] },
  CounterProposal: { id: 11, max: 512, domain: 'gpumarket/counter/v1\0', fields: [['negotiation_id', b16], ['round', u8], ['gpu_count', u8],
    ['duration_s', u32], ['price_per_gpu_second', K.amount], ['sent_ms', u53], sig] },
  Accept: { id: 12, max: 512, domain: 'gpumarket/accept/v1\0', fields: [['negotiation_id', b16], ['round', u8], ['agreement_id', b32],
    ['gpus', K.list(b32, 64)], ['consent_sig', b65], ['open_by', u53], ['sent_ms', u53], sig] },
  NegotiationReject: { id: 13, max: 512, domain: 'gpumarket/reject/v1\0', fields: [['negotiation_id', b16], ['round', u8], ['reason', u16],
    ['detail', K.text(200)], ['sent_ms', u53], sig] },
  Heartbeat: { id: 20, max: 4096, domain: 'gpumarket/heartbeat/v1\0', fields: [['agreement_id', b32], ['seq', u32], ['sent_ms', u53],
    ['nonce', b16], ['prev_hash', b32], ['metrics', K.list(GpuMetrics, 64)], sig] },
  UsageReceipt: { id: 21, max: 512, domain: 'gpumarket/receipt/v1\0', fields: [['agreement_id', b32], ['acked_seconds', u53],
    ['heartbeat_seq', u32], ['heartbeat_hash', b32], ['next_nonce', b16], ['sent_ms', u53], ['wallet_sig', b65], sig] },
  AccessGrant: { id: 22, max: 8192, domain: 'gpumarket/access/v1\0', fields: [['agreement_id', b32], ['access', K.text(4096)], ['sent_ms', u53], sig] },
  PreemptionNotice: { id: 23, max: 512, domain: 'gpumarket/preemption/v1\0', fields: [['agreement_id', b32], ['stop_ms', u53], ['reason', u8],
    ['detail', K.text(200)], ['after_heartbeat', b32], ['sent_ms', u53], sig] },
  EvidenceBundle: { id: 30, max: 16 * 1024 * 1024, domain: null, fields: [['terms', TermsWire], ['details', AgreementDetails],
    ['provider_binding', Binding], ['renter_binding', Binding], ['started_s', u53], ['heartbeats', K.list(K.bytesMax(4096), 200000)],
    ['receipts', K.list(K.bytesMax(512), 200000)], ['notices', K.list(K.bytesMax(512), 64)]] },
};
export const BY_ID = Object.fromEntries(Object.entries(MESSAGES).map(([name, m]) => [m.id, name]));
const GLOBAL_MAX = 16 * 1024 * 1024;

// value -> JS fields (bytes as Uint8Array, ints as BigInt, amount as BigInt, text as string)
function fit(kind, v, path) {
  const bad = (why) => { throw new WireError('bad_field', `${path}: ${why}`); };
  switch (kind.k) {
    case 'uint':
      if (v.t !== 'int') bad(`expected an integer, got ${v.t}`);
      if (v.v < 0n || v.v > kind.max) bad('out of range');
      return v.v;
    case 'amount':
      if (v.t !== 'bin') bad(`expected bin, got ${v.t}`);
      if (v.v.length > 32) bad('amount over 32 bytes');
      if (v.v.length > 0 && v.v[0] === 0) bad('amount with a leading zero byte');
      return beInt(v.v);
    case 'bytes':
      if (v.t !== 'bin') bad(`expected bin, got ${v.t}`);
      if (v.v.length !== kind.n) bad(`expected ${kind.n} bytes, got ${v.v.length}`);
      return v.v;
    case 'bytesMax':
      if (v.t !== 'bin') bad(`expected bin, got ${v.t}`);
      if (v.v.length > kind.n) bad(`over ${kind.n} bytes`);
      return v.v;
    case 'text':
      if (v.t !== 'str') bad(`expected str, got ${v.t}`);
      for (const ch of v.v) { const c = ch.codePointAt(0); if (c < 0x20 || c > 0x7e) bad(`character U+${c.toString(16)}`); }
      if (v.v.length > kind.n) bad(`over ${kind.n} characters`);
      return v.v;
    case 'list':
      if (v.t !== 'arr') bad(`expected an array, got ${v.t}`);
      if (v.v.length > kind.n) bad(`over ${kind.n} items`);
      return v.v.map((x, i) => fit(kind.of, x, `${path}[${i}]`));
    case 'struct':
      if (v.t !== 'arr') bad(`expected an array, got ${v.t}`);
      return fitFields(kind.fields, v.v, path);
  }
  throw new Error('bad kind');
}
function fitFields(fields, items, path) {
  if (items.length !== fields.length) throw new WireError('bad_field', `${path}: expected ${fields.length} fields, got ${items.length}`);
  const out = {};
  fields.forEach(([name, kind], i) => { out[name] = fit(kind, items[i], `${path}.${name}`); });
  return out;
}

// fields -> value (inverse of fit)
function unfit(kind, x) {
  switch (kind.k) {
    case 'uint': return { t: 'int', v: BigInt(x) };
    case 'amount': { let b = BigInt(x); const bytes = []; while (b > 0n) { bytes.unshift(Number(b & 0xffn)); b >>= 8n; } return { t: 'bin', v: new Uint8Array(bytes) }; }
    case 'bytes': case 'bytesMax': return { t: 'bin', v: x };
    case 'text': return { t: 'str', v: x };
    case 'list': return { t: 'arr', v: x.map((y) => unfit(kind.of, y)) };
    case 'struct': return { t: 'arr', v: kind.fields.map(([n, k]) => unfit(k, x[n])) };
  }
  throw new Error('bad kind');
}

// Parse steps 2..5 of wire.md "Decoding errors" (no schema)
export function parseCanonical(data) {
  const { value, end, tainted } = parseOne(data);
  if (end < data.length) throw new WireError(tainted ? 'malformed' : 'trailing_bytes', 'bytes after the value');
  if (tainted) throw new WireError('malformed', 'float, map or extension value');
  if (!eq(pack(value), data)) throw new WireError('non_canonical', 'not the canonical encoding');
  return value;
}

// Decode a message; expect = type name or null
export function decode(data, expect = null) {
  const limit = expect ? MESSAGES[expect].max : GLOBAL_MAX;
  if (data.length > limit) throw new WireError('oversized', `${data.length} > ${limit}`);
  const value = parseCanonical(data);
  if (value.t !== 'arr' || value.v.length < 2 || value.v[0].t !== 'int' || value.v[1].t !== 'int')
    throw new WireError('malformed', 'not [type, version, ...]');
  const type = value.v[0].v, version = value.v[1].v;
  const name = type >= 0n && type <= 0xffffn ? BY_ID[Number(type)] : undefined;
  if (!name) throw new WireError('unknown_type', `type ${type}`);
  if (expect && name !== expect) throw new WireError('unexpected_type', `${name}, expected ${expect}`);
  if (version !== 1n) throw new WireError('unsupported_version', `version ${version}`);
  const m = MESSAGES[name];
  if (data.length > m.max) throw new WireError('oversized', `${data.length} > ${m.max}`);
  const fields = fitFields(m.fields, value.v.slice(2), name);
  return { type: name, version: 1, fields };
}

export function encode(type, fields) {
  const m = MESSAGES[type];
  return pack({ t: 'arr', v: [{ t: 'int', v: BigInt(m.id) }, { t: 'int', v: 1n }, ...m.fields.map(([n, k]) => unfit(k, fields[n]))] });
}
export function encodeStruct(kind, fields) { return pack(unfit(kind, fields)); }
export function decodeStruct(kind, data) {
  const value = parseCanonical(data);
  return fit(kind, value, kind.name);
}

// ---------------------------------------------------------------- signatures
export function signingBytes(type, fields) {
  const m = MESSAGES[type];
  const unsigned = pack({ t: 'arr', v: [{ t: 'int', v: BigInt(m.id) }, { t: 'int', v: 1n },
    ...m.fields.slice(0, -1).map(([n, k]) => unfit(k, fields[n]))] });
  return { domain: ascii(m.domain), unsigned };
}
// wire.md "Signatures": RFC 8032 verification with libsodium's rules (crypto_sign_verify_detached):
// S < L; neither R nor the key a small-order point (by encoding, sign bit ignored); the key's
// encoding canonical; and the cofactorless equation, compared as bytes: encode([S]B - [k]A) == R.
// (noble's own verify is cofactored: it accepts signatures libsodium refuses.)
const EdPoint = ed25519.Point;
const ED_L = EdPoint.CURVE().n;
const ED_P = EdPoint.CURVE().p;
const leInt = (b) => beInt(Uint8Array.from(b).reverse());
// The encodings (sign bit cleared) libsodium refuses as R or as a key: the small-order points
// (y = 0, 1, p - 1 and the two order-8 y values) and the non-canonical p and p + 1 (0 and 1).
export const ED_SMALL_ORDER = [
  '0000000000000000000000000000000000000000000000000000000000000000',
  '0100000000000000000000000000000000000000000000000000000000000000',
  '26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05',
  'c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a',
  'ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f',
  'edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f',
  'eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f',
];
const ED_SMALL_ORDER_Y = new Set(ED_SMALL_ORDER.map((h) => leInt(unhex(h))));
const edY = (b) => leInt(b) & ((1n << 255n) - 1n);
export function ed25519Verify(sig64, msg, key32) {
  if (sig64.length !== 64 || key32.length !== 32) return false;
  const R = sig64.subarray(0, 32), S = leInt(sig64.subarray(32));
  if (S >= ED_L) return false;
  if (ED_SMALL_ORDER_Y.has(edY(R))) return false;
  if (edY(key32) >= ED_P || ED_SMALL_ORDER_Y.has(edY(key32))) return false;
  let A;
  try { A = EdPoint.fromBytes(key32, false); } catch { return false; }
  const k = leInt(sha512(concat(R, key32, msg))) % ED_L;
  const SB = S === 0n ? EdPoint.ZERO : EdPoint.BASE.multiply(S);
  const check = SB.subtract(k === 0n ? EdPoint.ZERO : A.multiplyUnsafe(k));
  return eq(check.toBytes(), R);
}
export const ed25519Cofactored = (sig64, msg, key32) => { try { return ed25519.verify(sig64, msg, key32, { zip215: false }); } catch { return false; } };
export function verifyMessage(type, fields, key) {
  const { domain, unsigned } = signingBytes(type, fields);
  return ed25519Verify(fields.signature, concat(domain, unsigned), key);
}

// libp2p peer id: base58btc(00 24 08 01 12 20 || key)
const B58 = '123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz';
export function base58(b) {
  let x = beInt(b), s = '';
  while (x > 0n) { s = B58[Number(x % 58n)] + s; x /= 58n; }
  for (const c of b) { if (c === 0) s = '1' + s; else break; }
  return s;
}
export const peerId = (key) => base58(concat(unhex('002408011220'), key));

// ---------------------------------------------------------------- EIP-712 / wallets
export const keccak = (b) => keccak_256(b);
const word = (x) => beBytes(BigInt(x), 32);
const addrWord = (a) => concat(new Uint8Array(12), a);
const SECP_N = secp256k1.Point.CURVE().n;

// returns the 20-byte address, or throws WireError with a bad_signature_* code
export function recoverWallet(digest, sig65) {
  if (sig65.length !== 65) throw new WireError('bad_signature_length', 'not 65 bytes');
  const v = sig65[64];
  if (v !== 27 && v !== 28) throw new WireError('bad_signature_v', `v = ${v}`);
  const r = beInt(sig65.subarray(0, 32)), s = beInt(sig65.subarray(32, 64));
  // wire.md: one code for every r or s out of range, zero and r >= n included
  if (!(r > 0n && r < SECP_N) || !(s > 0n && s <= (SECP_N - 1n) / 2n)) throw new WireError('bad_signature_high_s', 'r or s out of range');
  let pub;
  try {
    pub = secp256k1.Signature.fromBytes(sig65.subarray(0, 64), 'compact').addRecoveryBit(v - 27).recoverPublicKey(digest).toBytes(false);
  } catch { throw new WireError('bad_signature', 'does not recover'); }
  return keccak(pub.subarray(1)).subarray(12);
}

const DOMAIN_BINDING = 'EIP712Domain(string name,string version,uint256 chainId)';
const DOMAIN_ESCROW = 'EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)';
export function bindingDomainSeparator(chainId) {
  return keccak(concat(keccak(ascii(DOMAIN_BINDING)), keccak(ascii('gpumarket-binding')), keccak(ascii('1')), word(chainId)));
}
export const PEER_BINDING_TYPE = 'PeerBinding(bytes32 peerKey)';
export function bindingDigest(peerKey, chainId) {
  const structHash = keccak(concat(keccak(ascii(PEER_BINDING_TYPE)), peerKey));
  return keccak(concat(unhex('1901'), bindingDomainSeparator(chainId), structHash));
}
export function bindingPeerPayload(b) {
  return pack({ t: 'arr', v: [{ t: 'bin', v: b.peer_key }, { t: 'bin', v: b.wallet }, { t: 'int', v: BigInt(b.chain_id) }] });
}
export const BINDING_DOMAIN = ascii('gpumarket/binding/v1\0');
// validation.md row 15; order of the sub-checks as implemented here (see the report)
export function checkBinding(b) {
  if (b.wallet.every((x) => x === 0)) throw new WireError('binding_zero_wallet');
  if (!ed25519Verify(b.peer_sig, concat(BINDING_DOMAIN, bindingPeerPayload(b)), b.peer_key)) throw new WireError('binding_peer_sig');
  const got = recoverWallet(bindingDigest(b.peer_key, b.chain_id), b.wallet_sig);
  if (!eq(got, b.wallet)) throw new WireError('binding_wallet_mismatch');
}

export const AGREEMENT_TYPE = 'Agreement(address provider,address renter,address token,uint256 pricePerSecond,uint64 maxSeconds,uint32 heartbeatInterval,uint32 grace,address arbiter,uint32 disputeWindow,bytes32 detailsHash,uint64 openBy)';
export const RECEIPT_TYPE = 'Receipt(bytes32 agreementId,uint64 ackedSeconds)';
export function agreementId(t) {
  return keccak(concat(keccak(ascii(AGREEMENT_TYPE)), addrWord(t.provider), addrWord(t.renter), addrWord(t.token), word(t.price_per_second),
    word(t.max_seconds), word(t.heartbeat_interval), word(t.grace), addrWord(t.arbiter), word(t.dispute_window), t.details_hash, word(t.open_by)));
}
export function escrowDomainSeparator(chainId, escrow) {
  return keccak(concat(keccak(ascii(DOMAIN_ESCROW)), keccak(ascii('gpumarket-escrow')), keccak(ascii('1')), word(chainId), addrWord(escrow)));
}
export const eip712Digest = (ds, structHash) => keccak(concat(unhex('1901'), ds, structHash));
export const receiptStructHash = (id, acked) => keccak(concat(keccak(ascii(RECEIPT_TYPE)), id, word(acked)));

// ---------------------------------------------------------------- offer validation (validation.md)
export const DEFAULT_PARAMS = {
  clock_skew_ms: 30000, offer_max_lifetime_ms: 7200000, offer_min_lifetime_ms: 60000, book_max_providers: 200000,
  book_max_bytes: 134217728, book_established_ms: 600000, book_proven_renters: 2, binding_cache_size: 100000,
  min_heartbeat_interval_s: 5, max_heartbeat_interval_s: 600, max_rental_s: 2592000, min_grace_s: 300, max_grace_s: 604800,
  min_dispute_window_s: 300, max_dispute_window_s: 604800,
};

export class Verdict extends Error {
  constructor(verdict, code) { super(`${verdict}:${code}`); this.verdict = verdict; this.code = code; }
}
const REJECT = (code) => { throw new Verdict('reject', code); };
const IGNORE = (code) => { throw new Verdict('ignore', code); };
const isZero = (b) => b.every((x) => x === 0);

export function checkOfferStatic(o, p) {
  const n = (x) => Number(x);
  if (n(o.expires_ms) - n(o.created_ms) < p.offer_min_lifetime_ms || n(o.expires_ms) - n(o.created_ms) > p.offer_max_lifetime_ms) REJECT('bad_lifetime');
  if (o.gpus.length === 0) REJECT('no_gpus');
  const seen = new Set();
  for (const g of o.gpus) { const h = hex(g.uuid_digest); if (seen.has(h)) REJECT('duplicate_gpu'); seen.add(h); }
  for (const g of o.gpus) if (g.vram_mib === 0n || g.model === '' || g.cc_major === 0n) REJECT('bad_gpu');
  if (o.host.cpu_cores === 0n || o.host.ram_mib === 0n) REJECT('bad_host');
  const t = o.terms;
  const hb = n(t.heartbeat_interval_s), grace = n(t.grace_s), dw = n(t.dispute_window_s);
  const ok = t.price_per_gpu_second > 0n
    && 1 <= n(t.min_duration_s) && t.min_duration_s <= t.max_duration_s && n(t.max_duration_s) <= p.max_rental_s
    && p.min_heartbeat_interval_s <= hb && hb <= p.max_heartbeat_interval_s
    && grace >= hb && p.min_grace_s <= grace && grace <= p.max_grace_s
    && !isZero(t.escrow)
    && (isZero(t.arbiter) === (dw === 0))
    && (isZero(t.arbiter) || (p.min_dispute_window_s <= dw && dw <= p.max_dispute_window_s && !eq(t.arbiter, o.binding.wallet)))
    && t.token_decimals <= 36n
    && t.price_per_gpu_second * BigInt(o.gpus.length) * t.max_duration_s < (1n << 256n);
  if (!ok) REJECT('bad_terms');
  // interruptible sets
  const inOffer = new Set(o.gpus.map((g) => hex(g.uuid_digest)));
  const used = new Set(), notices = new Set();
  for (const s of o.interruptible) {
    if (s.gpus.length === 0) REJECT('bad_interruptible');
    for (const g of s.gpus) { const h = hex(g); if (!inOffer.has(h) || used.has(h)) REJECT('bad_interruptible'); used.add(h); }
    if (s.notice_s < 1n || notices.has(s.notice_s)) REJECT('bad_interruptible');
    notices.add(s.notice_s);
    if (!(s.price_per_gpu_second > 0n && s.price_per_gpu_second < t.price_per_gpu_second)) REJECT('bad_interruptible');
  }
  const suffix = `/p2p/${peerId(o.provider)}`;
  for (const a of o.addrs) if (!a.startsWith('/') || !a.endsWith(suffix)) REJECT('bad_addrs');
  if (!eq(o.binding.peer_key, o.provider)) REJECT('binding_peer_mismatch');
  if (o.binding.chain_id !== t.chain_id) REJECT('binding_chain_mismatch');
}

export function validateOffer(data, nowMs, p = DEFAULT_PARAMS, { knownSeq = -1, knownDigest = null, withdrawnSeq = -1, chainIds = null } = {}) {
  let msg;
  try { msg = decode(data, 'Offer'); } catch (e) { if (e instanceof WireError) REJECT(e.code); throw e; }
  const o = msg.fields;
  const seq = Number(o.seq);
  const digest = sha256(data);
  if (seq === knownSeq && knownDigest && eq(digest, knownDigest)) IGNORE('duplicate');
  if (Number(o.created_ms) > nowMs + p.clock_skew_ms) IGNORE('from_future');
  if (Number(o.expires_ms) + p.clock_skew_ms < nowMs) IGNORE('expired');
  if (chainIds && !chainIds.includes(Number(o.terms.chain_id))) IGNORE('wrong_chain');
  checkOfferStatic(o, p);
  if (!verifyMessage('Offer', o, o.provider)) REJECT('bad_signature');
  try { checkBinding(o.binding); } catch (e) { if (e instanceof WireError) REJECT(e.code); throw e; }
  if (seq === knownSeq) REJECT('equivocation');
  if (seq < knownSeq) IGNORE('stale_seq');
  if (seq <= withdrawnSeq) IGNORE('withdrawn');
  return { offer: o, digest };
}

export function validateWithdrawal(data, nowMs, p = DEFAULT_PARAMS, { withdrawnSeq = -1 } = {}) {
  let msg;
  try { msg = decode(data, 'OfferWithdrawal'); } catch (e) { if (e instanceof WireError) REJECT(e.code); throw e; }
  const w = msg.fields;
  if (Number(w.created_ms) > nowMs + p.clock_skew_ms) IGNORE('from_future');
  if (Number(w.created_ms) + p.offer_max_lifetime_ms + p.clock_skew_ms < nowMs) IGNORE('expired');
  if (Number(w.seq) <= withdrawnSeq) IGNORE('duplicate');
  if (!verifyMessage('OfferWithdrawal', w, w.provider)) REJECT('bad_signature');
  return w;
}

// ---------------------------------------------------------------- exec frames (runtime.md 2)
export const FRAME = { OPEN: 0x01, STDIN: 0x02, STDIN_EOF: 0x03, RESIZE: 0x04, FORWARD: 0x05, COPY: 0x06,
  ACCEPTED: 0x10, STDOUT: 0x11, STDERR: 0x12, EXIT: 0x13, REFUSED: 0x14 };
const FRAME_NAME = Object.fromEntries(Object.entries(FRAME).map(([k, v]) => [v, k]));

function parseAny(body) { // "a decoder accepts any valid msgpack"
  const { value, end } = parseOne(body);
  if (end !== body.length) throw new WireError('trailing_bytes');
  return value;
}
const isUint = (v, max) => v.t === 'int' && v.v >= 0n && v.v <= max;

export function decodeOpen(payload) {
  const bad = (why) => { throw new WireError('bad_open', why); };
  if (payload.length === 0 || payload[0] !== FRAME.OPEN) bad('not an OPEN frame');
  let v;
  try { v = parseAny(payload.subarray(1)); } catch { bad('not msgpack'); }
  if (v.t !== 'arr' || v.v.length !== 5) bad('not a 5-element array');
  const [id, tty, rows, cols, argv] = v.v;
  if (id.t !== 'bin' || id.v.length !== 32) bad('agreement_id');
  if (!(tty.t === 'int' && (tty.v === 0n || tty.v === 1n))) bad('tty');
  if (!isUint(rows, 65535n) || !isUint(cols, 65535n)) bad('rows/cols');
  if (argv.t !== 'arr' || argv.v.length > 256) bad('argv');
  for (const a of argv.v) if (a.t !== 'str' || a.v.includes('\0')) bad('argv item');
  if (argv.v.length === 0 && tty.v === 0n) bad('no command without a tty');
  return { kind: 'OPEN', agreement_id: id.v, tty: Number(tty.v), rows: Number(rows.v), cols: Number(cols.v), argv: argv.v.map((a) => a.v) };
}

// The renter's first frame on /gpumarket/forward/1 and /gpumarket/cp/1: one not well formed is
// refused bad_open (runtime.md 2.3, 2.4), not bad_frame.
export function decodeStreamOpen(payload) {
  const kind = FRAME_NAME[payload[0]];
  if (kind !== 'FORWARD' && kind !== 'COPY') throw new WireError('bad_open', 'not a FORWARD or COPY frame');
  try { return decodeFrame(payload); } catch (e) { throw new WireError('bad_open', e.message); }
}

export function decodeFrame(payload) {
  const kind = FRAME_NAME[payload[0]];
  const body = payload.subarray(1);
  const fail = (why) => { throw new WireError('bad_frame', why); };
  switch (kind) {
    case 'OPEN': return decodeOpen(payload);
    case 'STDIN': case 'STDOUT': case 'STDERR': return { kind, data: body };
    case 'STDIN_EOF': case 'ACCEPTED': if (body.length) fail('not empty'); return { kind };
    case 'RESIZE': if (body.length !== 4) fail('resize'); return { kind, rows: (body[0] << 8) | body[1], cols: (body[2] << 8) | body[3] };
    case 'EXIT': if (body.length !== 4) fail('exit'); return { kind, code: Buffer.from(body).readInt32BE(0) };
    case 'REFUSED': {
      const v = parseAny(body);
      if (v.t !== 'arr' || v.v.length !== 2 || v.v.some((x) => x.t !== 'str')) fail('refused');
      return { kind, code: v.v[0].v, detail: v.v[1].v };
    }
    case 'FORWARD': {
      const v = parseAny(body);
      if (v.t !== 'arr' || v.v.length !== 2 || v.v[0].t !== 'bin' || v.v[0].v.length !== 32 || !isUint(v.v[1], 65535n) || v.v[1].v === 0n) fail('forward');
      return { kind, agreement_id: v.v[0].v, port: Number(v.v[1].v) };
    }
    case 'COPY': {
      const v = parseAny(body);
      if (v.t !== 'arr' || v.v.length !== 3 || v.v[0].t !== 'bin' || v.v[0].v.length !== 32 || !isUint(v.v[1], 1n)
        || v.v[2].t !== 'str' || !v.v[2].v.startsWith('/') || v.v[2].v.includes('\0') || [...v.v[2].v].length > 4096) fail('copy');
      return { kind, agreement_id: v.v[0].v, direction: Number(v.v[1].v), path: v.v[2].v };
    }
  }
  fail(`unknown kind ${payload[0]}`);
}

export function encodeFrame(f) {
  const k = new Uint8Array([FRAME[f.kind]]);
  const str = (s) => ({ t: 'str', v: s });
  const int = (i) => ({ t: 'int', v: BigInt(i) });
  switch (f.kind) {
    case 'OPEN': return concat(k, pack({ t: 'arr', v: [{ t: 'bin', v: f.agreement_id }, int(f.tty), int(f.rows), int(f.cols), { t: 'arr', v: f.argv.map(str) }] }));
    case 'STDIN': case 'STDOUT': case 'STDERR': return concat(k, f.data);
    case 'STDIN_EOF': case 'ACCEPTED': return k;
    case 'RESIZE': return concat(k, beBytes(BigInt(f.rows), 2), beBytes(BigInt(f.cols), 2));
    case 'EXIT': return concat(k, beBytes(BigInt.asUintN(32, BigInt(f.code)), 4));
    case 'REFUSED': return concat(k, pack({ t: 'arr', v: [str(f.code), str(f.detail)] }));
    case 'FORWARD': return concat(k, pack({ t: 'arr', v: [{ t: 'bin', v: f.agreement_id }, int(f.port)] }));
    case 'COPY': return concat(k, pack({ t: 'arr', v: [{ t: 'bin', v: f.agreement_id }, int(f.direction), str(f.path)] }));
  }
  throw new Error(`unknown kind ${f.kind}`);
}
