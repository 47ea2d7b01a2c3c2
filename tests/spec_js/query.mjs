// The offer book's query language (specs/offerbook.md, "Derived facts", "Query language",
// "Classes"), from the spec only: parse a query, test it against one offer, and sort the matches.
import * as W from './impl.mjs';

export class QueryError extends Error {
  constructor(reason) { super(`bad_query: ${reason}`); this.code = 'bad_query'; this.reason = reason; }
}

const FIELDS = ['gpu', 'vram', 'count', 'price', 'region', 'cuda', 'score', 'cc', 'token', 'chain', 'image', 'class', 'notice'];
const EQ_ONLY = new Set(['gpu', 'region', 'token', 'chain', 'image', 'class']);
const OPS = ['==', '!=', '<=', '>=', '=', '<', '>']; // longest first
const NUMBER = /^(\d+(\.\d+)?|\.\d+)$/;

// a decimal string -> [n, s] meaning n / 10**s (exact)
const decimal = (v) => { const [i, f = ''] = v.split('.'); return [BigInt((i || '0') + f), BigInt(f.length)]; };
// exact comparison of two rationals a/b and c/d (b, d > 0)
const cmpFrac = (a, b, c, d) => { const l = a * d, r = c * b; return l < r ? -1 : l > r ? 1 : 0; };
const holds = (op, c) => ({ '=': c === 0, '!=': c !== 0, '<': c < 0, '<=': c <= 0, '>': c > 0, '>=': c >= 0 })[op];

// fnmatch-style glob: * any run, ? one character, [...] a set ([!...] negated; a ']' first in
// the set is literal; a '[' without a closing ']' is literal). Case-insensitive: pattern and
// value compared upper-cased.
function globRe(pattern) {
  pattern = pattern.toUpperCase();
  let re = '';
  for (let i = 0; i < pattern.length; i++) {
    const ch = pattern[i];
    if (ch === '*') re += '.*';
    else if (ch === '?') re += '.';
    else if (ch === '[') {
      let k = i + 1;
      if (pattern[k] === '!') k++;
      if (pattern[k] === ']') k++;
      const j = pattern.indexOf(']', k);
      if (j < 0) { re += '\\['; continue; }
      let body = pattern.slice(i + 1, j);
      const neg = body.startsWith('!');
      if (neg) body = body.slice(1);
      re += `[${neg ? '^' : ''}${body.replace(/[\\^\]\[]/g, '\\$&')}]`;
      i = j;
    } else re += ch.replace(/[.*+?^${}()|[\]\\\/]/g, '\\$&');
  }
  const r = new RegExp(`^${re}$`, 's');
  return { test: (v) => r.test(v.toUpperCase()), lead: new RegExp(`^${re}_.*$`, 's') };
}
const GLOB = /^[A-Za-z0-9_.*?\-\[\]]+$/, IMAGE_GLOB = /^[A-Za-z0-9_.*?\-\[\]:\/@]+$/;

export function parseQuery(q) {
  const terms = [];
  let col = 0;
  for (const word of q.split(' ')) {
    if (word === '') { col += 1; continue; }
    const m = /^([A-Za-z]+)(.*)$/.exec(word);
    if (!m) throw new QueryError(`expected a field at column ${col}`);
    const field = m[1].toLowerCase();
    if (!FIELDS.includes(field)) throw new QueryError(`unknown field '${m[1]}' at column ${col}`);
    const op0 = OPS.find((o) => m[2].startsWith(o));
    if (!op0) throw new QueryError(`expected an operator after ${field} at column ${col + m[1].length}`);
    const op = op0 === '==' ? '=' : op0;
    if (EQ_ONLY.has(field) && op !== '=' && op !== '!=') throw new QueryError(`${field} takes = or != only`);
    const value = m[2].slice(op0.length);
    const bad = (what) => { throw new QueryError(`bad value '${value}' for ${field} at column ${col + m[1].length + op0.length}: expected ${what}`); };
    let v;
    switch (field) {
      case 'vram': case 'price': case 'score':
        if (!NUMBER.test(value)) bad('a number');
        v = decimal(value);
        if (field === 'score' && v[0] > 10n ** v[1]) bad('a score between 0 and 1');
        break;
      case 'count': case 'notice': if (!/^\d+$/.test(value)) bad('an integer'); v = BigInt(value); break;
      case 'cuda': case 'cc': {
        if (!/^\d+(\.\d+)?$/.test(value)) bad('major[.minor]');
        const [a, b = '0'] = value.split('.'); v = [BigInt(a), BigInt(b)]; break;
      }
      case 'chain': if (!/^\d+(,\d+)*$/.test(value)) bad('an integer list'); v = value.split(',').map(BigInt); break;
      default:
        if (value.split(',').some((g) => !(field === 'image' ? IMAGE_GLOB : GLOB).test(g))) bad('a glob list');
        v = value.split(',').map(globRe);
    }
    terms.push({ field, op, value: v });
    col += word.length + 1;
  }
  return terms;
}

// ---------------------------------------------------------------- derived facts
const DROP = new Set(['NVIDIA', 'AMD', 'INTEL', 'GEFORCE', 'TESLA', 'QUADRO']);
export function modelToken(name) {
  const words = name.toUpperCase().split(/[^A-Z0-9]+/).filter((w) => w !== '');
  let i = 0;
  while (i < words.length && DROP.has(words[i])) i++;
  return (i === words.length ? words : words.slice(i)).join('_');
}
export function facts(o) {
  const g = o.gpus;
  const minBy = (f) => g.reduce((a, x) => (f(x) < a ? f(x) : a), f(g[0]));
  const minVram = minBy((x) => x.vram_mib);
  return {
    tokens: [...new Set(g.map((x) => modelToken(x.model)))],
    vram: (minVram * 2n + 1024n) / 2048n, // GiB rounded half up
    count: BigInt(g.length),
    cuda: minBy((x) => x.cuda_version),
    cc: g.map((x) => [x.cc_major, x.cc_minor]).reduce((a, x) => (x[0] < a[0] || (x[0] === a[0] && x[1] < a[1]) ? x : a)),
    region: o.host.region, token: o.terms.token_symbol, chain: o.terms.chain_id, images: o.images,
    decimals: o.terms.token_decimals,
  };
}
// classes: on-demand GPUs (if any) and each interruptible set
export function classes(o) {
  const inSets = new Set(o.interruptible.flatMap((s) => s.gpus.map(W.hex)));
  const out = [];
  if (o.gpus.some((g) => !inSets.has(W.hex(g.uuid_digest)))) out.push({ name: 'on-demand', notice: null, pps: o.terms.price_per_gpu_second });
  for (const s of o.interruptible) out.push({ name: 'interruptible', notice: s.notice_s, pps: s.price_per_gpu_second });
  return out;
}
// a price per GPU-second in smallest units -> comparable across tokens (units/GPU-hour * 10**(36-dec))
const comparable = (pps, dec) => pps * 3600n * 10n ** (36n - dec);

const anyGlob = (res, s) => res.some((r) => r.test(s));
// a float's exact value as [numerator, denominator] (scores are floats; terms exact decimals)
function floatRational(x) {
  const dv = new DataView(new ArrayBuffer(8));
  dv.setFloat64(0, x);
  const bits = dv.getBigUint64(0);
  const sign = bits >> 63n ? -1n : 1n, e = Number((bits >> 52n) & 0x7ffn), frac = bits & ((1n << 52n) - 1n);
  const mant = e === 0 ? frac : frac | (1n << 52n), exp = (e === 0 ? 1 : e) - 1075;
  return exp >= 0 ? [sign * (mant << BigInt(exp)), 1n] : [sign * mant, 1n << BigInt(-exp)];
}
function termHolds(t, o, f, score) {
  const { op, value } = t;
  switch (t.field) {
    case 'gpu': { // a pattern also matches a token's leading words
      const m = f.tokens.some((tok) => value.some((g) => g.test(tok) || g.lead.test(tok)));
      return op === '=' ? m : !m;
    }
    case 'region': case 'token': { const m = anyGlob(value, t.field === 'region' ? f.region : f.token); return op === '=' ? m : !m; }
    case 'image': { const m = f.images.some((i) => anyGlob(value, i)); return op === '=' ? m : !m; }
    case 'chain': { const m = value.includes(f.chain); return op === '=' ? m : !m; }
    case 'vram': return holds(op, cmpFrac(f.vram, 1n, value[0], 10n ** value[1]));
    case 'count': return holds(op, f.count < value ? -1 : f.count > value ? 1 : 0);
    case 'score': { const [a, b] = floatRational(score); return holds(op, cmpFrac(a, b, value[0], 10n ** value[1])); }
    case 'cuda': { const want = value[0] * 1000n + value[1] * 10n; return holds(op, f.cuda < want ? -1 : f.cuda > want ? 1 : 0); }
    case 'cc': {
      const [a, b] = f.cc, [c, d] = value;
      return holds(op, a !== c ? (a < c ? -1 : 1) : b < d ? -1 : b > d ? 1 : 0);
    }
  }
  throw new Error(t.field);
}
const priceHolds = (t, pps, dec) => holds(t.op, cmpFrac(pps * 3600n, 10n ** dec, t.value[0], 10n ** t.value[1]));
function classHolds(t, c) {
  if (t.field === 'class') { const m = anyGlob(t.value, c.name); return t.op === '=' ? m : !m; }
  if (t.field === 'notice') return c.notice !== null && holds(t.op, c.notice < t.value ? -1 : c.notice > t.value ? 1 : 0);
  throw new Error(t.field);
}

// null when the offer does not match, else its sort price (comparable units)
export function matchPrice(terms, o, score = 0.5) {
  const f = facts(o);
  const bound = terms.some((t) => t.field === 'class' || t.field === 'notice');
  for (const t of terms) if (!['price', 'class', 'notice'].includes(t.field) && !termHolds(t, o, f, score)) return null;
  const prices = terms.filter((t) => t.field === 'price');
  if (!bound) {
    const pps = o.terms.price_per_gpu_second;
    return prices.every((t) => priceHolds(t, pps, f.decimals)) ? comparable(pps, f.decimals) : null;
  }
  const ok = classes(o).filter((c) => terms.every((t) => (t.field === 'price' ? priceHolds(t, c.pps, f.decimals)
    : t.field === 'class' || t.field === 'notice' ? classHolds(t, c) : true)));
  if (!ok.length) return null;
  return ok.map((c) => comparable(c.pps, f.decimals)).reduce((a, x) => (x < a ? x : a));
}

// entries: [{offer, digest (hex), score?}] -> the matches in order. Sorts: price, -price, vram,
// -vram, count, -count, score, -score (the field, then price ascending, then digest; the class
// price in a class-bound query); rank is not modelled here.
export function query(entries, q, sort = 'price', limit = null) {
  const terms = parseQuery(q);
  const hits = [];
  for (const e of entries) {
    const p = matchPrice(terms, e.offer, e.score ?? 0.5);
    if (p !== null) hits.push({ e, p, f: facts(e.offer) });
  }
  const desc = sort.startsWith('-'), name = desc ? sort.slice(1) : sort;
  const fieldOf = { price: (h) => h.p, vram: (h) => h.f.vram, count: (h) => h.f.count, score: (h) => h.e.score ?? 0.5 }[name];
  if (!fieldOf) throw new QueryError(`sort ${sort} not modelled here`);
  const c = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
  hits.sort((a, b) => (desc ? -1 : 1) * c(fieldOf(a), fieldOf(b)) || c(a.p, b.p) || c(a.e.digest, b.e.digest));
  const out = hits.map((h) => h.e);
  return limit === null ? out : out.slice(0, limit);
}
