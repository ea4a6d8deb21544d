/**
 * WGSL templates of causal grouped-query attention, flash-style: scores exist only as one
 * Br×Bc tile in workgroup memory, never as [S,S] in global memory.
 *
 * B = rows, S = tokens per row, T = B·S, H = query heads, Hkv = kv heads, G = H / Hkv,
 * hd = head dim (a multiple of 4; vectors are vec4), W = sliding window (0: none).
 * Buffers: q[T,H,hd], k[T,Hkv,hd], v[T,Hkv,hd], out[T,H,hd], dout[T,H,hd], lse[T,H] (f32),
 * docs[T] (u32 or i32 document ids), stats[T,H] = vec2(lse, D) with D = rowsum(dout ⊙ out).
 * Within a row, query i attends key j iff j <= i, j + W > i (when W > 0) and docs[i] == docs[j];
 * head h reads kv head ⌊h / G⌋.
 *
 * Kernels (the host sizes every dispatch; tile sizes come from the host, kernels/ops/attention.ts):
 * - forward: one workgroup per (query tile of Br rows, head h, row b) = grid (⌈S/Br⌉, H, B), Br·TPR
 *   threads: TPR threads per query row. It walks the key tiles of Bc keys that the causal and window
 *   bounds leave, skips tiles where no (query, key) pair shares a document, and keeps the running
 *   max m, sum l and output accumulator in f32 registers (online softmax): per tile, each thread's
 *   max and sum over its own keys meet in workgroup memory, so exp runs once per (query, key).
 *   Writes out `=`, lse `=`.
 * - stats: one invocation per (token, head): stats = (lse, D). Writes stats `=`.
 * - dq: same grid and threads as the forward; for each key tile recomputes p = exp(s − lse) and
 *   ds = p·(dout·v − D), then dq += scale·ds·k. Skips tiles as the forward does. Writes dq `=`.
 * - dkdv: one workgroup per (key tile of Bc keys, kv head, row b) = grid (⌈S/Bc⌉, Hkv, B), Bc·TPR
 *   threads: TPR threads per key. It walks the G query heads of its kv head and the query tiles
 *   the causal and window bounds leave, and accumulates dv += p·dout and dk += scale·ds·q in
 *   registers, so dk and dv are written once (`=`), with no atomics (WGSL has no float atomics).
 *
 * A thread owning row r of a tile and lane t < TPR computes the scores (r, c) for c ≡ t (mod TPR)
 * as full hd-long dot products from workgroup memory, and owns the output vec4s d4 ≡ t (mod TPR).
 * Masked scores hold the finite sentinel MASKED (WGSL has no infinity literal, and shader
 * compilers may assume finite floats); a row with every score so far masked keeps m = MASKED,
 * l = 0, acc = 0, and its p are 0, never exp(MASKED − MASKED).
 * Workgroup memory is f32 for every input dtype; accumulation is f32.
 *
 * Row chunks (`chunks` in a variant): tensors larger than one storage binding are split along T into
 * separate buffers. A chunked variant runs once per (query range, key range) pair whose ranges can
 * interact, binding for each tensor the one chunk that holds the range; `at_X` in the uniforms is the
 * first token of the chunk bound as X, so token τ of X sits at row τ − at_X of the binding. The grid
 * covers the query tiles (forward, dq) or key tiles (dkdv) of rows row0.. that meet the dispatch's range,
 * tiles still aligned to row starts; workgroups whose tile misses the range return at once.
 * - forward: the state (m, l, acc) of a query after some keys is kept between dispatches as
 *   (o, lse) = (acc / l, m + log l). Continuing from it with m = lse, l = 1, acc = o is exact:
 *   over the keys already summed, Σ exp(s − lse) = l·e^(m − lse) = 1 and Σ exp(s − lse)·v = acc / l = o.
 *   A query with no allowed key yet has the empty state lse = MASKED, o = 0 (continued as m = MASKED,
 *   l = 0, acc = 0). A query starts fresh in the key range that holds the first key its position
 *   allows, max(row start, i + 1 − W) (documents aside); the host walks key ranges in increasing
 *   order, so later ranges continue.
 * - dq: starts (`=`) in that same key range, adds (`+=`) in later ones.
 * - dkdv: starts in the query range that holds the key itself (its first query), adds in later ones.
 * - stats: one dispatch per row range lying in one chunk of dout, out, lse and stats.
 * Document ids of queries and keys come from one DOC binding, or from DOCQ and DOCK when docs itself is
 * chunked (`splitDocs`): the query's and the key's chunk may differ.
 * @module
 */

/** Float dtypes of attention tensors. */
export type AttentionFloat = "f32" | "f16";

/** Dtypes of document ids (compared for equality only). */
export type DocDType = "u32" | "i32";

/** One kernel's tile: Br query rows, Bc keys, TPR threads per row (forward, dq) or per key (dkdv). */
export interface AttentionTile {
  BR: number;
  BC: number;
  TPR: number;
}

/** The kernels of the attention op. */
export type AttentionKernel = "forward" | "dq" | "dkdv";

/** Bytes of the uniform block (see `Params`) of a variant on whole tensors. */
export const ATTENTION_UNIFORM_BYTES = 32;

/** Row chunking of a variant: how document ids are bound (see the module documentation). */
export interface AttentionChunks {
  /** docs is itself split, so queries read DOCQ and keys DOCK (possibly two chunks of it). */
  splitDocs: boolean;
}

/** Where one dispatch of a chunked variant runs (token indices of the whole tensor, T = B·S). */
export interface ChunkDispatch {
  /** Row b of the grid's first z and query (forward, dq) or key (dkdv) tile of its first x. */
  row0: number;
  tile0: number;
  /** Queries [qLo, qHi) and keys [kLo, kHi) of this dispatch. */
  qLo: number;
  qHi: number;
  kLo: number;
  kHi: number;
}

/** Bytes of the uniform block of a chunked variant with `buffers` storage bindings. */
export function attentionChunkUniformBytes(buffers: number): number {
  return Math.ceil((12 + buffers) / 4) * 16;
}

/** Invocations per workgroup of the stats kernel. */
export const ATTENTION_STATS_WORKGROUP = 256;

/** Packs the uniform block: S, H, Hkv, W (0: none), scale, n (stats: T·H). */
export function attentionUniforms(
  p: { S: number; H: number; Hkv: number; window: number; scale: number; n?: number },
): Uint32Array {
  const u = new Uint32Array(8);
  u.set([p.S, p.H, p.Hkv, p.window]);
  new Float32Array(u.buffer)[4] = p.scale;
  u[5] = p.n ?? 0;
  return u;
}

/**
 * Packs the uniform block of a chunked variant: S, H, Hkv, W, scale, n, row0, tile0, q_lo, q_hi, k_lo,
 * k_hi, then `at` = the first token of the chunk bound at each storage binding, in binding order.
 */
export function attentionChunkUniforms(
  p: { S: number; H: number; Hkv: number; window: number; scale: number; n?: number },
  d: ChunkDispatch,
  at: readonly number[],
): Uint32Array {
  const u = new Uint32Array(attentionChunkUniformBytes(at.length) / 4);
  u.set(attentionUniforms(p).subarray(0, 6));
  u.set([d.row0, d.tile0, d.qLo, d.qHi, d.kLo, d.kHi, ...at], 6);
  return u;
}

/** Workgroup memory of a kernel in f32 words (atomics and flags excluded). */
export function attentionSharedWords(kernel: AttentionKernel, hd: number, t: AttentionTile): number {
  switch (kernel) {
    case "forward": // Qs[Br,hd], KVs[Bc,hd] (k, then v), Ps[Br,Bc], Ms, Ls [Br,TPR]
      return (t.BR + t.BC) * hd + t.BR * t.BC + 2 * t.BR * t.TPR;
    case "dq": // Qs, dOs [Br,hd], Ks, Vs [Bc,hd], dSs[Br,Bc]
      return 2 * (t.BR + t.BC) * hd + t.BR * t.BC;
    case "dkdv": // Ks, Vs [Bc,hd], Qs, dOs [Br,hd], Pt, dSt [Bc,Br], Ls, Ds [Br]
      return 2 * (t.BR + t.BC) * hd + 2 * t.BR * t.BC + 2 * t.BR;
  }
}

/** Bytes of workgroup memory of a kernel, flags included. */
export function attentionSharedBytes(kernel: AttentionKernel, hd: number, t: AttentionTile): number {
  return 4 * attentionSharedWords(kernel, hd, t) + 8;
}

/** Invocations per workgroup of a kernel. */
export function attentionThreads(kernel: AttentionKernel, t: AttentionTile): number {
  return (kernel === "dkdv" ? t.BC : t.BR) * t.TPR;
}

/** Checks the template's rules for a tile and head dim. */
export function checkAttentionTile(hd: number, t: AttentionTile): void {
  const ok = hd % 4 === 0 && (hd / 4) % t.TPR === 0 &&
    [t.BR, t.BC, t.TPR].every((x) => Number.isInteger(x) && x > 0);
  if (!ok) {
    throw new RangeError(
      `Cannot build attention tile ${
        JSON.stringify(t)
      } for hd ${hd}: hd must be a multiple of 4 and hd/4 of TPR`,
    );
  }
}

/** Everything that selects one compiled forward variant. */
export interface ForwardVariant {
  hd: number;
  tile: AttentionTile;
  q: AttentionFloat;
  k: AttentionFloat;
  v: AttentionFloat;
  out: AttentionFloat;
  docs: DocDType | null;
  /** Row-chunk addressing; absent or null: whole tensors. */
  chunks?: AttentionChunks | null;
}

/** Everything that selects one compiled backward (dq or dkdv) variant. */
export interface BackwardVariant {
  hd: number;
  tile: AttentionTile;
  q: AttentionFloat;
  k: AttentionFloat;
  v: AttentionFloat;
  dout: AttentionFloat;
  /** dtype of the gradients written (dq, or dk and dv). */
  grad: AttentionFloat;
  docs: DocDType | null;
  /** Row-chunk addressing; absent or null: whole tensors. */
  chunks?: AttentionChunks | null;
}

/** Everything that selects one compiled stats variant. */
export interface StatsVariant {
  hd: number;
  dout: AttentionFloat;
  out: AttentionFloat;
  /** One row range per dispatch, each buffer a row chunk (see the module documentation). */
  chunked?: boolean;
}

const HEADER = `
struct Params { S: u32, H: u32, Hkv: u32, window: u32, scale: f32, n: u32, pad0: u32, pad1: u32 }
// Score of a masked (query, key) pair: finite, below any real score.
const MASKED: f32 = -3.0e38;`;

/** The uniform block of a chunked variant: HEADER's fields, the dispatch's ranges, and at_X per binding. */
function chunkHeader(list: Binding[]): string {
  return `
struct Params {
  S: u32, H: u32, Hkv: u32, window: u32, scale: f32, n: u32, row0: u32, tile0: u32,
  q_lo: u32, q_hi: u32, k_lo: u32, k_hi: u32, // this dispatch's queries and keys, as tokens of T
  ${list.map(([name]) => `at_${name}: u32,`).join(" ")} // first token of the chunk bound as each buffer
}
// Score of a masked (query, key) pair: finite, below any real score.
const MASKED: f32 = -3.0e38;
// Row-local position of the first key query i may attend: max(0, i + 1 − W).
fn first_key(i: u32) -> u32 {
  if (u.window != 0u && i >= u.window) { return i + 1u - u.window; }
  return 0u;
}`;
}

// Causal and sliding-window rule within a row (row-local positions i: query, j: key).
const ALLOWED = `
fn allowed(i: u32, j: u32) -> bool {
  return j <= i && (u.window == 0u || j + u.window > i);
}`;

type Binding = [name: string, type: string, access: "read" | "read_write"];

/** The kernel's opening lines; with `chunked` (its bindings) the uniform block of a chunked variant. */
function prelude(dtypes: AttentionFloat[], chunked: Binding[] | null = null): string[] {
  return [dtypes.includes("f16") ? "enable f16;" : "", chunked ? chunkHeader(chunked) : HEADER, ALLOWED];
}

/** Declares bindings in order; returns the WGSL lines. */
function bindings(list: Binding[]): string[] {
  const lines = list.map(([name, type, access], i) =>
    `@group(0) @binding(${i}) var<storage, ${access}> ${name}: ${type};`
  );
  lines.push(`@group(0) @binding(${list.length}) var<uniform> u: Params;`);
  return lines;
}

/** Prelude and bindings of a kernel, as its first lines. */
function opening(dtypes: AttentionFloat[], list: Binding[], chunked: boolean): string[] {
  return [...prelude(dtypes, chunked ? list : null), ...bindings(list)];
}

const vec = (t: AttentionFloat) => `array<vec4<${t}>>`;

/**
 * How a kernel addresses tokens (row-local positions of row `base`): in whole tensors every buffer holds
 * token `base + pos` at that row and positions below S exist; in row chunks buffer X holds it at row
 * `base + pos − at_X`, and only the dispatch's queries [qa, qb) and keys [ka, kb) are loaded and scored.
 */
interface Rows {
  chunked: boolean;
  /** Row of buffer X that holds row-local position `pos`. */
  tok(X: string, pos: string): string;
  /** Whether query (key) position x is one of this dispatch's. */
  qIn(x: string): string;
  kIn(x: string): string;
  /** x moved into this dispatch's queries (keys): for reads whose value a mask discards. */
  qClamp(x: string): string;
  kClamp(x: string): string;
  /** Document id of query (key) position x. */
  docQ(x: string): string;
  docK(x: string): string;
}

function rowsOf(chunks: AttentionChunks | null | undefined): Rows {
  if (!chunks) {
    const clamp = (x: string) => `min(${x}, u.S - 1u)`;
    const inRow = (x: string) => `${x} < u.S`;
    const doc = (x: string) => `DOC[base + ${x}]`;
    return {
      chunked: false,
      tok: (_X, pos) => `base + ${pos}`,
      qIn: inRow,
      kIn: inRow,
      qClamp: clamp,
      kClamp: clamp,
      docQ: doc,
      docK: doc,
    };
  }
  const tok = (X: string, pos: string) => `base + ${pos} - u.at_${X}`;
  const [dq, dk] = chunks.splitDocs ? ["DOCQ", "DOCK"] : ["DOC", "DOC"];
  return {
    chunked: true,
    tok,
    qIn: (x) => `${x} >= qa && ${x} < qb`,
    kIn: (x) => `${x} >= ka && ${x} < kb`,
    qClamp: (x) => `clamp(${x}, qa, qb - 1u)`,
    kClamp: (x) => `clamp(${x}, ka, kb - 1u)`,
    docQ: (x) => `${dq}[${tok(dq, x)}]`,
    docK: (x) => `${dk}[${tok(dk, x)}]`,
  };
}

/** The document-id bindings: one DOC, or DOCQ and DOCK when docs itself is split into chunks. */
function docBindings(docs: DocDType | null, chunks: AttentionChunks | null | undefined): Binding[] {
  if (docs === null) return [];
  if (chunks?.splitDocs) return [["DOCQ", `array<${docs}>`, "read"], ["DOCK", `array<${docs}>`, "read"]];
  return [["DOC", `array<${docs}>`, "read"]];
}

/** Storage bindings of each kernel, in order (the host binds buffers in the same order). */
export function attentionBindingNames(
  kernel: AttentionKernel | "stats",
  docs: boolean,
  chunks: AttentionChunks | null = null,
): string[] {
  const d = docs ? (chunks?.splitDocs ? ["DOCQ", "DOCK"] : ["DOC"]) : [];
  switch (kernel) {
    case "forward":
      return ["Q", "K", "V", ...d, "O", "LSE"];
    case "stats":
      return ["DO", "O", "LSE", "STATS"];
    case "dq":
      return ["Q", "K", "V", "DO", "STATS", ...d, "DQ"];
    case "dkdv":
      return ["Q", "K", "V", "DO", "STATS", ...d, "DK", "DV"];
  }
}

/** Lines of the uniform "is any pair of this tile allowed" test that ends in `continue` when none is. */
function tileSkip(pairs: string, cond: string): string {
  return `
    // Skip the tile when no (query, key) pair of it is allowed (documents): decided by all threads,
    // read back uniformly so that every barrier below stays in uniform control flow.
    var any_pair = false;
    ${pairs} {
      if (${cond}) { any_pair = true; }
    }
    if (any_pair) { atomicOr(&tile_live, 1u); }
    workgroupBarrier();
    if (li == 0u) {
      tile_flag = atomicLoad(&tile_live);
      atomicStore(&tile_live, 0u);
    }
    if (workgroupUniformLoad(&tile_flag) == 0u) { continue; }`;
}

const SKIP_DECLS = `
var<workgroup> tile_live: atomic<u32>;
var<workgroup> tile_flag: u32;`;

/** `f(0) … f(n − 1)` joined by newlines: the unrolled per-thread vec4 lines of a kernel. */
function unroll(n: number, f: (k: number) => string): string {
  return Array.from({ length: n }, (_, k) => f(k)).join("\n");
}

/**
 * Lines `X[at + n·TPR + t] = value(n)` for a thread's vec4s n = 0 … N − 1, stored as vec4<type>; with
 * `add`, the value is added to what X holds (a gradient summed over dispatches).
 */
function storeVec4s(
  X: string,
  at: string,
  N: number,
  TPR: number,
  type: AttentionFloat,
  value: (n: number) => string,
  add: boolean,
  indent: string,
): string {
  return unroll(N, (n) => {
    const e = `${X}[${at} + ${n * TPR}u + t]`;
    return `${indent}${e} = vec4<${type}>(${add ? `vec4<f32>(${e}) + ` : ""}${value(n)});`;
  });
}

/** The inputs every backward kernel reads: q, k, v, dout, (lse, D), and doc ids when given. */
function backwardInputs(v: BackwardVariant): Binding[] {
  const list: Binding[] = [
    ["Q", vec(v.q), "read"],
    ["K", vec(v.k), "read"],
    ["V", vec(v.v), "read"],
    ["DO", vec(v.dout), "read"],
    ["STATS", "array<vec2<f32>>", "read"],
  ];
  list.push(...docBindings(v.docs, v.chunks));
  return list;
}

/**
 * Lines loading the vec4 `s % hd/4` of position `pos` from buffers A and B (same shape) into x and y,
 * zero outside the guard; `scaleA` multiplies A's value.
 */
function loadPair(
  R: Rows,
  [A, B]: [string, string],
  pos: string,
  guard: string,
  heads: string,
  head: string,
  HD4: number,
  indent: string,
  scaleA = "",
): string {
  const at = (X: string) => `((${R.tok(X, pos)}) * ${heads} + ${head}) * ${HD4}u + s % ${HD4}u`;
  const i = indent;
  return [
    `${i}var x = vec4<f32>(0.0);`,
    `${i}var y = vec4<f32>(0.0);`,
    `${i}if (${guard}) {`,
    ...(R.chunked
      ? [`${i}  x = vec4<f32>(${A}[${at(A)}])${scaleA};`, `${i}  y = vec4<f32>(${B}[${at(B)}]);`]
      : [
        `${i}  let o = ${at(A)};`,
        `${i}  x = vec4<f32>(${A}[o])${scaleA};`,
        `${i}  y = vec4<f32>(${B}[o]);`,
      ]),
    `${i}}`,
  ].join("\n");
}

/**
 * Where a query-tile workgroup stands: first query q0, head h, row base, kv head, this thread's query i;
 * in row chunks also the dispatch's queries [qa, qb) of the row (a tile outside them returns).
 */
function queryTileIds(BR: number, TPR: number, R: Rows): string {
  const head = R.chunked
    ? `  let q0 = (u.tile0 + wg.x) * ${BR}u;
  let h = wg.y;
  let base = (u.row0 + wg.z) * u.S; // first token of row b
  // This dispatch's queries of row b, row-local: [qa, qb) = [q_lo, q_hi) ∩ row b.
  let qa = max(u.q_lo, base) - base;
  let qb = max(min(u.q_hi, base + u.S), base) - base;
  if (q0 + ${BR}u <= qa || q0 >= qb) { return; }`
    : `  let q0 = wg.x * ${BR}u;
  let h = wg.y;
  let base = wg.z * u.S; // first token of row b`;
  return `${head}
  let kvh = h / (u.H / u.Hkv);
  let r = li / ${TPR}u;
  let t = li % ${TPR}u;
  let i = q0 + r;
  let row_ok = ${R.qIn("i")};`;
}

/**
 * The key tiles a query tile visits, from k_start while `keyLoop(R)` holds, as the causal and window
 * bounds (and in row chunks the dispatch's keys [ka, kb)) leave them, and the document id of this
 * thread's query.
 */
function queryTileKeyRange(BR: number, BC: number, docs: boolean, R: Rows): string {
  const doc = `  ${docs ? `let doc_i = ${R.docQ(R.qClamp("i"))};` : ""}`;
  if (!R.chunked) {
    return `${doc}
  // Keys left by the causal and window bounds: [q0 + 1 − W, last query of the tile].
  let q_last = min(q0 + ${BR}u, u.S) - 1u;
  var k_start = 0u;
  if (u.window != 0u && q0 >= u.window) { k_start = (q0 + 1u - u.window) / ${BC}u * ${BC}u; }`;
  }
  return `${doc}
  // This dispatch's keys of row b, row-local: [ka, kb) = [k_lo, k_hi) ∩ row b.
  let ka = max(u.k_lo, base) - base;
  let kb = max(min(u.k_hi, base + u.S), base) - base;
  // Keys left by the causal and window bounds and the range: [max(ka, q0 + 1 − W), last query] ∩ [ka, kb).
  let q_last = min(q0 + ${BR}u, qb) - 1u;
  var k_start = ka / ${BC}u * ${BC}u;
  if (u.window != 0u && q0 >= u.window) { k_start = max(k_start, (q0 + 1u - u.window) / ${BC}u * ${BC}u); }
  let k_end = min(q_last + 1u, kb);`;
}

/** Condition of the key-tile loop of a query-tile kernel (see {@link queryTileKeyRange}). */
function keyLoop(R: Rows): string {
  return R.chunked ? "k0 < k_end" : "k0 <= q_last";
}

/** Start of a key-tile iteration of a query-tile kernel: skip tiles of other documents, else a barrier. */
function keyTileEntry(BC: number, TPR: number, docs: boolean, R: Rows): string {
  return docs
    ? tileSkip(
      `for (var c = t; c < ${BC}u; c += ${TPR}u)`,
      `row_ok && ${R.kIn("k0 + c")} && allowed(i, k0 + c) && ${R.docK("k0 + c")} == doc_i`,
    )
    : "workgroupBarrier();";
}

/** WGSL of the forward kernel (see the module documentation). */
export function attentionForwardWgsl(v: ForwardVariant): string {
  const { hd } = v;
  const { BR, BC, TPR } = v.tile;
  checkAttentionTile(hd, v.tile);
  const HD4 = hd / 4;
  const N = HD4 / TPR; // output vec4s per thread
  const THREADS = BR * TPR;
  const docs = v.docs !== null;
  const R = rowsOf(v.chunks);
  const list: Binding[] = [
    ["Q", vec(v.q), "read"],
    ["K", vec(v.k), "read"],
    ["V", vec(v.v), "read"],
  ];
  list.push(...docBindings(v.docs, v.chunks));
  list.push(["O", vec(v.out), "read_write"], ["LSE", "array<f32>", "read_write"]);
  const L = opening([v.q, v.k, v.v, v.out], list, R.chunked);
  L.push(`
var<workgroup> Qs: array<vec4<f32>, ${BR * HD4}>;  // Qs[r·hd/4 + d4] = scale · q[row q0 + r]
var<workgroup> KVs: array<vec4<f32>, ${BC * HD4}>; // k, then v, of keys k0 .. k0 + Bc
var<workgroup> Ps: array<f32, ${BR * BC}>;         // Ps[r·Bc + c] = score (or MASKED), then p
var<workgroup> Ms: array<f32, ${BR * TPR}>;        // Ms[r·TPR + t] = max of thread t's scores of row r
var<workgroup> Ls: array<f32, ${BR * TPR}>;        // Ls[r·TPR + t] = sum of thread t's p of row r`);
  if (docs) L.push(SKIP_DECLS);
  const acc = (n: number) => `acc${n}`;
  const range = (f: (n: number) => string) => unroll(N, f);
  const docCond = docs ? ` && ${R.docK("j")} == doc_i` : "";
  const loadKV = (src: string) => `
    for (var s = li; s < ${BC * HD4}u; s += ${THREADS}u) {
      let j = k0 + s / ${HD4}u;
      var x = vec4<f32>(0.0);
      if (${R.kIn("j")}) { x = vec4<f32>(${src}[((${
    R.tok(src, "j")
  }) * u.Hkv + kvh) * ${HD4}u + s % ${HD4}u]); }
      KVs[s] = x;
    }`;
  const outAt = `((${R.tok("O", "i")}) * u.H + h) * ${HD4}u`;
  const lseAt = `(${R.tok("LSE", "i")}) * u.H + h`;
  // Row chunks: continue from the state earlier key ranges left in (out, lse) (module documentation).
  const resume = R.chunked
    ? `
  // Earlier key ranges left this query's state as (o, lse) unless this range holds its first key.
  let o_at = ${outAt};
  if (row_ok && base + first_key(i) < u.k_lo) {
    m = LSE[${lseAt}];
    if (m != MASKED) { l = 1.0; }
${range((n) => `    ${acc(n)} = vec4<f32>(O[o_at + ${n * TPR}u + t]);`)}
  }
  storageBarrier(); // lse is read by every thread of the row before one of them writes it`
    : "";
  const store = R.chunked
    ? `  if (row_ok) {
    // A query with no allowed key so far keeps the empty state: out = 0, lse = MASKED.
    var inv = 0.0;
    var lse = MASKED;
    if (l > 0.0) {
      inv = 1.0 / l;
      lse = m + log(l);
    }
${range((n) => `    O[o_at + ${n * TPR}u + t] = vec4<${v.out}>(${acc(n)} * inv);`)}
    if (t == 0u) { LSE[${lseAt}] = lse; }
  }`
    : `  if (row_ok) {
    let o = ${outAt};
    let inv = 1.0 / l;
${range((n) => `    O[o + ${n * TPR}u + t] = vec4<${v.out}>(${acc(n)} * inv);`)}
    if (t == 0u) { LSE[${lseAt}] = m + log(l); }
  }`;
  L.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
${queryTileIds(BR, TPR, R)}
  for (var s = li; s < ${BR * HD4}u; s += ${THREADS}u) {
    let ii = q0 + s / ${HD4}u;
    var x = vec4<f32>(0.0);
    if (${R.qIn("ii")}) { x = vec4<f32>(Q[((${
    R.tok("Q", "ii")
  }) * u.H + h) * ${HD4}u + s % ${HD4}u]) * u.scale; }
    Qs[s] = x;
  }
${queryTileKeyRange(BR, BC, docs, R)}
  var m = MASKED;
  var l = 0.0;
${range((n) => `  var ${acc(n)} = vec4<f32>(0.0);`)}${resume}
  for (var k0 = k_start; ${keyLoop(R)}; k0 += ${BC}u) {
    ${keyTileEntry(BC, TPR, docs, R)}
    ${loadKV("K")}
    workgroupBarrier();
    // Scores of this thread's keys, and their max.
    var m_own = MASKED;
    for (var c = t; c < ${BC}u; c += ${TPR}u) {
      let j = k0 + c;
      var sc = MASKED;
      if (row_ok && ${R.kIn("j")} && allowed(i, j)${docCond}) {
        var qk = 0.0;
        for (var d = 0u; d < ${HD4}u; d++) { qk += dot(Qs[r * ${HD4}u + d], KVs[c * ${HD4}u + d]); }
        sc = qk;
      }
      Ps[r * ${BC}u + c] = sc;
      m_own = max(m_own, sc);
    }
    Ms[li] = m_own;
    workgroupBarrier();
    ${loadKV("V")}
    // Row max over the TPR threads of the row; then p = exp(s − m_new) once per pair, in place.
    var m_new = m;
    for (var x = 0u; x < ${TPR}u; x++) { m_new = max(m_new, Ms[r * ${TPR}u + x]); }
    var l_own = 0.0;
    for (var c = t; c < ${BC}u; c += ${TPR}u) {
      let sc = Ps[r * ${BC}u + c];
      var p = 0.0;
      if (sc != MASKED) { p = exp(sc - m_new); }
      Ps[r * ${BC}u + c] = p;
      l_own += p;
    }
    Ls[li] = l_own;
    workgroupBarrier();
    // Online softmax: rescale what was summed under the old max.
    let alpha = exp(m - m_new);
    l *= alpha;
    for (var x = 0u; x < ${TPR}u; x++) { l += Ls[r * ${TPR}u + x]; }
${range((n) => `    ${acc(n)} *= alpha;`)}
    for (var c = 0u; c < ${BC}u; c++) {
      let p = Ps[r * ${BC}u + c];
${range((n) => `      ${acc(n)} += p * KVs[c * ${HD4}u + ${n * TPR}u + t];`)}
    }
    m = m_new;
  }
${store}
}`);
  return L.join("\n");
}

/** WGSL of the stats kernel: stats[t,h] = (lse[t,h], Σ_d dout[t,h,d]·out[t,h,d]). */
export function attentionStatsWgsl(v: StatsVariant): string {
  const HD4 = v.hd / 4;
  const chunked = v.chunked === true;
  const list: Binding[] = [
    ["DO", vec(v.dout), "read"],
    ["O", vec(v.out), "read"],
    ["LSE", "array<f32>", "read"],
    ["STATS", "array<vec2<f32>>", "read_write"],
  ];
  const L = opening([v.dout, v.out], list, chunked);
  // Row chunks: `row` counts (token − q_lo)·H + head, and buffer X holds token τ at row τ − at_X.
  const at = (X: string) => chunked ? `(row + (u.q_lo - u.at_${X}) * u.H)` : "row";
  L.push(`
@compute @workgroup_size(${ATTENTION_STATS_WORKGROUP})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
  let row = (wg.y * nwg.x + wg.x) * ${ATTENTION_STATS_WORKGROUP}u + li; // token·H + head
  if (row >= u.n) { return; }
  var d = 0.0;
  for (var x = 0u; x < ${HD4}u; x++) {
    d += dot(vec4<f32>(DO[${at("DO")} * ${HD4}u + x]), vec4<f32>(O[${at("O")} * ${HD4}u + x]));
  }
  STATS[${at("STATS")}] = vec2<f32>(LSE[${at("LSE")}], d);
}`);
  return L.join("\n");
}

/** WGSL of the dq kernel (see the module documentation). */
export function attentionDqWgsl(v: BackwardVariant): string {
  const { hd } = v;
  const { BR, BC, TPR } = v.tile;
  checkAttentionTile(hd, v.tile);
  const HD4 = hd / 4;
  const N = HD4 / TPR;
  const THREADS = BR * TPR;
  const docs = v.docs !== null;
  const R = rowsOf(v.chunks);
  const list = backwardInputs(v);
  list.push(["DQ", vec(v.grad), "read_write"]);
  const L = opening([v.q, v.k, v.v, v.dout, v.grad], list, R.chunked);
  L.push(`
var<workgroup> Qs: array<vec4<f32>, ${BR * HD4}>;  // scale · q of rows q0 .. q0 + Br
var<workgroup> dOs: array<vec4<f32>, ${BR * HD4}>; // dout of rows q0 .. q0 + Br
var<workgroup> Ks: array<vec4<f32>, ${BC * HD4}>;  // k of keys k0 .. k0 + Bc
var<workgroup> Vs: array<vec4<f32>, ${BC * HD4}>;  // v of keys k0 .. k0 + Bc
var<workgroup> dSs: array<f32, ${BR * BC}>;        // dSs[r·Bc + c] = ds (0 where masked)`);
  if (docs) L.push(SKIP_DECLS);
  const range = (f: (n: number) => string) => unroll(N, f);
  const docCond = docs ? ` && ${R.docK("j")} == doc_i` : "";
  const dqAt = `((${R.tok("DQ", "i")}) * u.H + h) * ${HD4}u`;
  // Row chunks: dq starts in the key range that holds the query's first key and adds in later ones.
  const store = R.chunked
    ? `  if (row_ok) {
    let o = ${dqAt};
    if (base + first_key(i) >= u.k_lo) {
${storeVec4s("DQ", "o", N, TPR, v.grad, (n) => `acc${n} * u.scale`, false, "      ")}
    } else {
${storeVec4s("DQ", "o", N, TPR, v.grad, (n) => `acc${n} * u.scale`, true, "      ")}
    }
  }`
    : `  if (row_ok) {
    let o = ${dqAt};
${storeVec4s("DQ", "o", N, TPR, v.grad, (n) => `acc${n} * u.scale`, false, "    ")}
  }`;
  L.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
${queryTileIds(BR, TPR, R)}
  for (var s = li; s < ${BR * HD4}u; s += ${THREADS}u) {
    let ii = q0 + s / ${HD4}u;
${loadPair(R, ["Q", "DO"], "ii", R.qIn("ii"), "u.H", "h", HD4, "    ", " * u.scale")}
    Qs[s] = x;
    dOs[s] = y;
  }
  let st = STATS[(${R.tok("STATS", R.qClamp("i"))}) * u.H + h]; // (lse, D) of query i
${queryTileKeyRange(BR, BC, docs, R)}
${range((n) => `  var acc${n} = vec4<f32>(0.0);`)}
  for (var k0 = k_start; ${keyLoop(R)}; k0 += ${BC}u) {
    ${keyTileEntry(BC, TPR, docs, R)}
    for (var s = li; s < ${BC * HD4}u; s += ${THREADS}u) {
      let j = k0 + s / ${HD4}u;
${loadPair(R, ["K", "V"], "j", R.kIn("j"), "u.Hkv", "kvh", HD4, "      ")}
      Ks[s] = x;
      Vs[s] = y;
    }
    workgroupBarrier();
    // ds = p · (dout·v − D), p = exp(scale·q·k − lse)
    for (var c = t; c < ${BC}u; c += ${TPR}u) {
      let j = k0 + c;
      var ds = 0.0;
      if (row_ok && ${R.kIn("j")} && allowed(i, j)${docCond}) {
        var qk = 0.0;
        var dp = 0.0;
        for (var d = 0u; d < ${HD4}u; d++) {
          qk += dot(Qs[r * ${HD4}u + d], Ks[c * ${HD4}u + d]);
          dp += dot(dOs[r * ${HD4}u + d], Vs[c * ${HD4}u + d]);
        }
        ds = exp(qk - st.x) * (dp - st.y);
      }
      dSs[r * ${BC}u + c] = ds;
    }
    workgroupBarrier();
    for (var c = 0u; c < ${BC}u; c++) {
      let ds = dSs[r * ${BC}u + c];
${range((n) => `      acc${n} += ds * Ks[c * ${HD4}u + ${n * TPR}u + t];`)}
    }
  }
${store}
}`);
  return L.join("\n");
}

/** WGSL of the dkdv kernel (see the module documentation). */
export function attentionDkdvWgsl(v: BackwardVariant): string {
  const { hd } = v;
  const { BR, BC, TPR } = v.tile;
  checkAttentionTile(hd, v.tile);
  const HD4 = hd / 4;
  const N = HD4 / TPR;
  const THREADS = BC * TPR;
  const docs = v.docs !== null;
  const R = rowsOf(v.chunks);
  const list = backwardInputs(v);
  list.push(["DK", vec(v.grad), "read_write"], ["DV", vec(v.grad), "read_write"]);
  const L = opening([v.q, v.k, v.v, v.dout, v.grad], list, R.chunked);
  L.push(`
var<workgroup> Ks: array<vec4<f32>, ${BC * HD4}>;  // k of keys k0 .. k0 + Bc
var<workgroup> Vs: array<vec4<f32>, ${BC * HD4}>;  // v of keys k0 .. k0 + Bc
var<workgroup> Qs: array<vec4<f32>, ${BR * HD4}>;  // scale · q of rows q0 .. q0 + Br (head h)
var<workgroup> dOs: array<vec4<f32>, ${BR * HD4}>; // dout of rows q0 .. q0 + Br (head h)
var<workgroup> Pt: array<f32, ${BC * BR}>;         // Pt[c·Br + r] = p (0 where masked)
var<workgroup> dSt: array<f32, ${BC * BR}>;        // dSt[c·Br + r] = ds (0 where masked)
var<workgroup> Ls: array<f32, ${BR}>;              // lse of rows q0 .. q0 + Br
var<workgroup> Ds: array<f32, ${BR}>;              // D of rows q0 .. q0 + Br`);
  if (docs) L.push(SKIP_DECLS);
  const range = (f: (n: number) => string) => unroll(N, f);
  const docCond = docs ? ` && ${R.docQ("i")} == doc_j` : "";
  const head = R.chunked
    ? `  let k0 = (u.tile0 + wg.x) * ${BC}u;
  let kvh = wg.y;
  let base = (u.row0 + wg.z) * u.S;
  // This dispatch's keys of row b, row-local: [ka, kb) = [k_lo, k_hi) ∩ row b.
  let ka = max(u.k_lo, base) - base;
  let kb = max(min(u.k_hi, base + u.S), base) - base;
  if (k0 + ${BC}u <= ka || k0 >= kb) { return; }`
    : `  let k0 = wg.x * ${BC}u;
  let kvh = wg.y;
  let base = wg.z * u.S;`;
  const queries = R.chunked
    ? `  // This dispatch's queries of row b, row-local: [qa, qb) = [q_lo, q_hi) ∩ row b.
  let qa = max(u.q_lo, base) - base;
  let qb = max(min(u.q_hi, base + u.S), base) - base;
  // Queries left by the causal and window bounds and the range: [first query tile holding max(k0, qa),
  // last key + W − 1] ∩ [qa, qb).
  let k_last = min(k0 + ${BC}u, kb) - 1u;
  var q_last = u.S - 1u;
  if (u.window != 0u) { q_last = min(q_last, k_last + u.window - 1u); }
  let q_start = max(k0, qa) / ${BR}u * ${BR}u;
  let q_end = min(q_last + 1u, qb);`
    : `  // Queries left by the causal and window bounds: [first query tile holding k0, last key + W − 1].
  let k_last = min(k0 + ${BC}u, u.S) - 1u;
  var q_last = u.S - 1u;
  if (u.window != 0u) { q_last = min(q_last, k_last + u.window - 1u); }
  let q_start = k0 / ${BR}u * ${BR}u;`;
  const at = (X: string) => `((${R.tok(X, "j")}) * u.Hkv + kvh) * ${HD4}u`;
  // Row chunks: dk and dv start in the query range that holds key j (its first query) and add in later ones.
  const store = R.chunked
    ? `  if (key_ok) {
    let ok = ${at("DK")};
    let ov = ${at("DV")};
    if (base + j >= u.q_lo) {
${storeVec4s("DK", "ok", N, TPR, v.grad, (n) => `dk${n}`, false, "      ")}
${storeVec4s("DV", "ov", N, TPR, v.grad, (n) => `dv${n}`, false, "      ")}
    } else {
${storeVec4s("DK", "ok", N, TPR, v.grad, (n) => `dk${n}`, true, "      ")}
${storeVec4s("DV", "ov", N, TPR, v.grad, (n) => `dv${n}`, true, "      ")}
    }
  }`
    : `  if (key_ok) {
    let o = ${at("DK")};
${storeVec4s("DK", "o", N, TPR, v.grad, (n) => `dk${n}`, false, "    ")}
${storeVec4s("DV", "o", N, TPR, v.grad, (n) => `dv${n}`, false, "    ")}
  }`;
  L.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
${head}
  let G = u.H / u.Hkv;
  let c = li / ${TPR}u;
  let t = li % ${TPR}u;
  let j = k0 + c;
  let key_ok = ${R.kIn("j")};
  for (var s = li; s < ${BC * HD4}u; s += ${THREADS}u) {
    let jj = k0 + s / ${HD4}u;
${loadPair(R, ["K", "V"], "jj", R.kIn("jj"), "u.Hkv", "kvh", HD4, "    ")}
    Ks[s] = x;
    Vs[s] = y;
  }
  ${docs ? `let doc_j = ${R.docK(R.kClamp("j"))};` : ""}
${queries}
${range((n) => `  var dk${n} = vec4<f32>(0.0);\n  var dv${n} = vec4<f32>(0.0);`)}
  for (var g = 0u; g < G; g++) {
    let h = kvh * G + g;
    for (var q0 = q_start; ${R.chunked ? "q0 < q_end" : "q0 <= q_last"}; q0 += ${BR}u) {
      ${
    docs
      ? tileSkip(
        `for (var r = t; r < ${BR}u; r += ${TPR}u)`,
        `key_ok && ${R.qIn("q0 + r")} && allowed(q0 + r, j) && ${R.docQ("q0 + r")} == doc_j`,
      )
      : "workgroupBarrier();"
  }
      for (var s = li; s < ${BR * HD4}u; s += ${THREADS}u) {
        let ii = q0 + s / ${HD4}u;
${loadPair(R, ["Q", "DO"], "ii", R.qIn("ii"), "u.H", "h", HD4, "        ", " * u.scale")}
        Qs[s] = x;
        dOs[s] = y;
      }
      for (var s = li; s < ${BR}u; s += ${THREADS}u) {
        let ii = q0 + s;
        var st = vec2<f32>(0.0);
        if (${R.qIn("ii")}) { st = STATS[(${R.tok("STATS", "ii")}) * u.H + h]; }
        Ls[s] = st.x;
        Ds[s] = st.y;
      }
      workgroupBarrier();
      for (var r = t; r < ${BR}u; r += ${TPR}u) {
        let i = q0 + r;
        var p = 0.0;
        var ds = 0.0;
        if (key_ok && ${R.qIn("i")} && allowed(i, j)${docCond}) {
          var qk = 0.0;
          var dp = 0.0;
          for (var d = 0u; d < ${HD4}u; d++) {
            qk += dot(Qs[r * ${HD4}u + d], Ks[c * ${HD4}u + d]);
            dp += dot(dOs[r * ${HD4}u + d], Vs[c * ${HD4}u + d]);
          }
          p = exp(qk - Ls[r]);
          ds = p * (dp - Ds[r]);
        }
        Pt[c * ${BR}u + r] = p;
        dSt[c * ${BR}u + r] = ds;
      }
      workgroupBarrier();
      for (var r = 0u; r < ${BR}u; r++) {
        let p = Pt[c * ${BR}u + r];
        let ds = dSt[c * ${BR}u + r];
${range((n) => `        dv${n} += p * dOs[r * ${HD4}u + ${n * TPR}u + t];`)}
${range((n) => `        dk${n} += ds * Qs[r * ${HD4}u + ${n * TPR}u + t];`)}
      }
    }
  }
${store}
}`);
  return L.join("\n");
}
