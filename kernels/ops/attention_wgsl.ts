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

/** Bytes of the uniform block (see `Params`). */
export const ATTENTION_UNIFORM_BYTES = 32;

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
}

/** Everything that selects one compiled stats variant. */
export interface StatsVariant {
  hd: number;
  dout: AttentionFloat;
  out: AttentionFloat;
}

const HEADER = `
struct Params { S: u32, H: u32, Hkv: u32, window: u32, scale: f32, n: u32, pad0: u32, pad1: u32 }
// Score of a masked (query, key) pair: finite, below any real score.
const MASKED: f32 = -3.0e38;`;

// Causal and sliding-window rule within a row (row-local positions i: query, j: key).
const ALLOWED = `
fn allowed(i: u32, j: u32) -> bool {
  return j <= i && (u.window == 0u || j + u.window > i);
}`;

function prelude(dtypes: AttentionFloat[]): string[] {
  return [dtypes.includes("f16") ? "enable f16;" : "", HEADER, ALLOWED];
}

/** Declares bindings in order; returns the WGSL lines. */
function bindings(list: [name: string, type: string, access: "read" | "read_write"][]): string[] {
  const lines = list.map(([name, type, access], i) =>
    `@group(0) @binding(${i}) var<storage, ${access}> ${name}: ${type};`
  );
  lines.push(`@group(0) @binding(${list.length}) var<uniform> u: Params;`);
  return lines;
}

const vec = (t: AttentionFloat) => `array<vec4<${t}>>`;

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

/** The inputs every backward kernel reads: q, k, v, dout, (lse, D), and doc ids when given. */
function backwardInputs(v: BackwardVariant): [string, string, "read" | "read_write"][] {
  const list: [string, string, "read" | "read_write"][] = [
    ["Q", vec(v.q), "read"],
    ["K", vec(v.k), "read"],
    ["V", vec(v.v), "read"],
    ["DO", vec(v.dout), "read"],
    ["STATS", "array<vec2<f32>>", "read"],
  ];
  if (v.docs !== null) list.push(["DOC", `array<${v.docs}>`, "read"]);
  return list;
}

/** Where a query-tile workgroup stands: first query q0, head h, row base, kv head, this thread's query i. */
function queryTileIds(BR: number, TPR: number): string {
  return `  let q0 = wg.x * ${BR}u;
  let h = wg.y;
  let base = wg.z * u.S; // first token of row b
  let kvh = h / (u.H / u.Hkv);
  let r = li / ${TPR}u;
  let t = li % ${TPR}u;
  let i = q0 + r;
  let row_ok = i < u.S;`;
}

/**
 * The key tiles a query tile visits, [k_start, q_last], as the causal and window bounds leave them,
 * and the document id of this thread's query.
 */
function queryTileKeyRange(BR: number, BC: number, docs: boolean): string {
  return `  ${docs ? "let doc_i = DOC[base + min(i, u.S - 1u)];" : ""}
  // Keys left by the causal and window bounds: [q0 + 1 − W, last query of the tile].
  let q_last = min(q0 + ${BR}u, u.S) - 1u;
  var k_start = 0u;
  if (u.window != 0u && q0 >= u.window) { k_start = (q0 + 1u - u.window) / ${BC}u * ${BC}u; }`;
}

/** Start of a key-tile iteration of a query-tile kernel: skip tiles of other documents, else a barrier. */
function keyTileEntry(BC: number, TPR: number, docs: boolean): string {
  return docs
    ? tileSkip(
      `for (var c = t; c < ${BC}u; c += ${TPR}u)`,
      `row_ok && k0 + c < u.S && allowed(i, k0 + c) && DOC[base + k0 + c] == doc_i`,
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
  const L = prelude([v.q, v.k, v.v, v.out]);
  const list: [string, string, "read" | "read_write"][] = [
    ["Q", vec(v.q), "read"],
    ["K", vec(v.k), "read"],
    ["V", vec(v.v), "read"],
  ];
  if (docs) list.push(["DOC", `array<${v.docs}>`, "read"]);
  list.push(["O", vec(v.out), "read_write"], ["LSE", "array<f32>", "read_write"]);
  L.push(...bindings(list));
  L.push(`
var<workgroup> Qs: array<vec4<f32>, ${BR * HD4}>;  // Qs[r·hd/4 + d4] = scale · q[row q0 + r]
var<workgroup> KVs: array<vec4<f32>, ${BC * HD4}>; // k, then v, of keys k0 .. k0 + Bc
var<workgroup> Ps: array<f32, ${BR * BC}>;         // Ps[r·Bc + c] = score (or MASKED), then p
var<workgroup> Ms: array<f32, ${BR * TPR}>;        // Ms[r·TPR + t] = max of thread t's scores of row r
var<workgroup> Ls: array<f32, ${BR * TPR}>;        // Ls[r·TPR + t] = sum of thread t's p of row r`);
  if (docs) L.push(SKIP_DECLS);
  const acc = (n: number) => `acc${n}`;
  const range = (f: (n: number) => string) => unroll(N, f);
  const docCond = docs ? ` && DOC[base + j] == doc_i` : "";
  const loadKV = (src: string) => `
    for (var s = li; s < ${BC * HD4}u; s += ${THREADS}u) {
      let j = k0 + s / ${HD4}u;
      var x = vec4<f32>(0.0);
      if (j < u.S) { x = vec4<f32>(${src}[((base + j) * u.Hkv + kvh) * ${HD4}u + s % ${HD4}u]); }
      KVs[s] = x;
    }`;
  L.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
${queryTileIds(BR, TPR)}
  for (var s = li; s < ${BR * HD4}u; s += ${THREADS}u) {
    let ii = q0 + s / ${HD4}u;
    var x = vec4<f32>(0.0);
    if (ii < u.S) { x = vec4<f32>(Q[((base + ii) * u.H + h) * ${HD4}u + s % ${HD4}u]) * u.scale; }
    Qs[s] = x;
  }
${queryTileKeyRange(BR, BC, docs)}
  var m = MASKED;
  var l = 0.0;
${range((n) => `  var ${acc(n)} = vec4<f32>(0.0);`)}
  for (var k0 = k_start; k0 <= q_last; k0 += ${BC}u) {
    ${keyTileEntry(BC, TPR, docs)}
    ${loadKV("K")}
    workgroupBarrier();
    // Scores of this thread's keys, and their max.
    var m_own = MASKED;
    for (var c = t; c < ${BC}u; c += ${TPR}u) {
      let j = k0 + c;
      var sc = MASKED;
      if (row_ok && j < u.S && allowed(i, j)${docCond}) {
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
  if (row_ok) {
    let o = ((base + i) * u.H + h) * ${HD4}u;
    let inv = 1.0 / l;
${range((n) => `    O[o + ${n * TPR}u + t] = vec4<${v.out}>(${acc(n)} * inv);`)}
    if (t == 0u) { LSE[(base + i) * u.H + h] = m + log(l); }
  }
}`);
  return L.join("\n");
}

/** WGSL of the stats kernel: stats[t,h] = (lse[t,h], Σ_d dout[t,h,d]·out[t,h,d]). */
export function attentionStatsWgsl(v: StatsVariant): string {
  const HD4 = v.hd / 4;
  const L = prelude([v.dout, v.out]);
  L.push(...bindings([
    ["DO", vec(v.dout), "read"],
    ["O", vec(v.out), "read"],
    ["LSE", "array<f32>", "read"],
    ["STATS", "array<vec2<f32>>", "read_write"],
  ]));
  L.push(`
@compute @workgroup_size(${ATTENTION_STATS_WORKGROUP})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
  let row = (wg.y * nwg.x + wg.x) * ${ATTENTION_STATS_WORKGROUP}u + li; // token·H + head
  if (row >= u.n) { return; }
  var d = 0.0;
  for (var x = 0u; x < ${HD4}u; x++) {
    d += dot(vec4<f32>(DO[row * ${HD4}u + x]), vec4<f32>(O[row * ${HD4}u + x]));
  }
  STATS[row] = vec2<f32>(LSE[row], d);
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
  const L = prelude([v.q, v.k, v.v, v.dout, v.grad]);
  const list = backwardInputs(v);
  list.push(["DQ", vec(v.grad), "read_write"]);
  L.push(...bindings(list));
  L.push(`
var<workgroup> Qs: array<vec4<f32>, ${BR * HD4}>;  // scale · q of rows q0 .. q0 + Br
var<workgroup> dOs: array<vec4<f32>, ${BR * HD4}>; // dout of rows q0 .. q0 + Br
var<workgroup> Ks: array<vec4<f32>, ${BC * HD4}>;  // k of keys k0 .. k0 + Bc
var<workgroup> Vs: array<vec4<f32>, ${BC * HD4}>;  // v of keys k0 .. k0 + Bc
var<workgroup> dSs: array<f32, ${BR * BC}>;        // dSs[r·Bc + c] = ds (0 where masked)`);
  if (docs) L.push(SKIP_DECLS);
  const range = (f: (n: number) => string) => unroll(N, f);
  const docCond = docs ? ` && DOC[base + j] == doc_i` : "";
  L.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
${queryTileIds(BR, TPR)}
  for (var s = li; s < ${BR * HD4}u; s += ${THREADS}u) {
    let ii = q0 + s / ${HD4}u;
    var x = vec4<f32>(0.0);
    var y = vec4<f32>(0.0);
    if (ii < u.S) {
      let o = ((base + ii) * u.H + h) * ${HD4}u + s % ${HD4}u;
      x = vec4<f32>(Q[o]) * u.scale;
      y = vec4<f32>(DO[o]);
    }
    Qs[s] = x;
    dOs[s] = y;
  }
  let st = STATS[(base + min(i, u.S - 1u)) * u.H + h]; // (lse, D) of query i
${queryTileKeyRange(BR, BC, docs)}
${range((n) => `  var acc${n} = vec4<f32>(0.0);`)}
  for (var k0 = k_start; k0 <= q_last; k0 += ${BC}u) {
    ${keyTileEntry(BC, TPR, docs)}
    for (var s = li; s < ${BC * HD4}u; s += ${THREADS}u) {
      let j = k0 + s / ${HD4}u;
      var x = vec4<f32>(0.0);
      var y = vec4<f32>(0.0);
      if (j < u.S) {
        let o = ((base + j) * u.Hkv + kvh) * ${HD4}u + s % ${HD4}u;
        x = vec4<f32>(K[o]);
        y = vec4<f32>(V[o]);
      }
      Ks[s] = x;
      Vs[s] = y;
    }
    workgroupBarrier();
    // ds = p · (dout·v − D), p = exp(scale·q·k − lse)
    for (var c = t; c < ${BC}u; c += ${TPR}u) {
      let j = k0 + c;
      var ds = 0.0;
      if (row_ok && j < u.S && allowed(i, j)${docCond}) {
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
  if (row_ok) {
    let o = ((base + i) * u.H + h) * ${HD4}u;
${range((n) => `    DQ[o + ${n * TPR}u + t] = vec4<${v.grad}>(acc${n} * u.scale);`)}
  }
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
  const L = prelude([v.q, v.k, v.v, v.dout, v.grad]);
  const list = backwardInputs(v);
  list.push(["DK", vec(v.grad), "read_write"], ["DV", vec(v.grad), "read_write"]);
  L.push(...bindings(list));
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
  const docCond = docs ? ` && DOC[base + i] == doc_j` : "";
  L.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
  let k0 = wg.x * ${BC}u;
  let kvh = wg.y;
  let base = wg.z * u.S;
  let G = u.H / u.Hkv;
  let c = li / ${TPR}u;
  let t = li % ${TPR}u;
  let j = k0 + c;
  let key_ok = j < u.S;
  for (var s = li; s < ${BC * HD4}u; s += ${THREADS}u) {
    let jj = k0 + s / ${HD4}u;
    var x = vec4<f32>(0.0);
    var y = vec4<f32>(0.0);
    if (jj < u.S) {
      let o = ((base + jj) * u.Hkv + kvh) * ${HD4}u + s % ${HD4}u;
      x = vec4<f32>(K[o]);
      y = vec4<f32>(V[o]);
    }
    Ks[s] = x;
    Vs[s] = y;
  }
  ${docs ? "let doc_j = DOC[base + min(j, u.S - 1u)];" : ""}
  // Queries left by the causal and window bounds: [first query tile holding k0, last key + W − 1].
  let k_last = min(k0 + ${BC}u, u.S) - 1u;
  var q_last = u.S - 1u;
  if (u.window != 0u) { q_last = min(q_last, k_last + u.window - 1u); }
  let q_start = k0 / ${BR}u * ${BR}u;
${range((n) => `  var dk${n} = vec4<f32>(0.0);\n  var dv${n} = vec4<f32>(0.0);`)}
  for (var g = 0u; g < G; g++) {
    let h = kvh * G + g;
    for (var q0 = q_start; q0 <= q_last; q0 += ${BR}u) {
      ${
    docs
      ? tileSkip(
        `for (var r = t; r < ${BR}u; r += ${TPR}u)`,
        `key_ok && q0 + r < u.S && allowed(q0 + r, j) && DOC[base + q0 + r] == doc_j`,
      )
      : "workgroupBarrier();"
  }
      for (var s = li; s < ${BR * HD4}u; s += ${THREADS}u) {
        let ii = q0 + s / ${HD4}u;
        var x = vec4<f32>(0.0);
        var y = vec4<f32>(0.0);
        if (ii < u.S) {
          let o = ((base + ii) * u.H + h) * ${HD4}u + s % ${HD4}u;
          x = vec4<f32>(Q[o]) * u.scale;
          y = vec4<f32>(DO[o]);
        }
        Qs[s] = x;
        dOs[s] = y;
      }
      for (var s = li; s < ${BR}u; s += ${THREADS}u) {
        let ii = q0 + s;
        var st = vec2<f32>(0.0);
        if (ii < u.S) { st = STATS[(base + ii) * u.H + h]; }
        Ls[s] = st.x;
        Ds[s] = st.y;
      }
      workgroupBarrier();
      for (var r = t; r < ${BR}u; r += ${TPR}u) {
        let i = q0 + r;
        var p = 0.0;
        var ds = 0.0;
        if (key_ok && i < u.S && allowed(i, j)${docCond}) {
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
  if (key_ok) {
    let o = ((base + j) * u.Hkv + kvh) * ${HD4}u;
${range((n) => `    DK[o + ${n * TPR}u + t] = vec4<${v.grad}>(dk${n});`)}
${range((n) => `    DV[o + ${n * TPR}u + t] = vec4<${v.grad}>(dv${n});`)}
  }
}`);
  return L.join("\n");
}
