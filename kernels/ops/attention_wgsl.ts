/**
 * WGSL templates of causal grouped-query attention, flash-style: scores exist only as one
 * Br×Bc tile in workgroup memory, never as [S,S] in global memory.
 *
 * B = rows, S = tokens per row, T = B·S, H = query heads, Hkv = kv heads, G = H / Hkv,
 * hd = head dim (a multiple of 4; vectors are vec4), W = sliding window (0: none).
 * Buffers: q[T,H,hd], k[T,Hkv,hd], v[T,Hkv,hd], out[T,H,hd], dout[T,H,hd], lse[T,H] (f32),
 * docs[T] (u32 or i32 document ids), stats[T,H] = vec2(lse, D) with D = rowsum(dout ⊙ out).
 * Within a row, query i attends key j iff j <= i, j + W > i (when W > 0) and docs[i] == docs[j];
 * head h reads kv head ⌊h / G⌋. s = scale·q·k.
 *
 * Kernels (the host sizes every dispatch; tile sizes come from the host, kernels/ops/attention.ts):
 * - forward: one workgroup per (query tile of Br rows, head h, row b) = grid (⌈S/Br⌉, H, B). It walks the
 *   key tiles of Bc keys that the causal and window bounds leave, skips tiles where no (query, key) pair
 *   shares a document, and keeps the running max m, sum l and output accumulator in f32 registers (online
 *   softmax). Per key tile: k into workgroup memory and v into registers; each thread its RPT×Bc/TPR
 *   block of scores in registers and their row max; the row max over the TPR threads of a row group; v
 *   stored where k was, p = exp(s − m_new) once per (query, key) into workgroup memory; then each thread
 *   adds p·v to its RPT×(hd/TPR) output block, summing l from the same p. Writes out `=`, lse `=`.
 * - stats: one invocation per (token, head): stats = (lse, D). Writes stats `=`.
 * - dq: same grid and threads as the forward; per key tile, k and v into workgroup memory, each thread its
 *   block of s and dp = dout·v, ds = p·(dp − D) with p = exp(s − lse) into workgroup memory, then
 *   dq += ds·k on its output block; scale applied at the store. Skips tiles as the forward does. Writes
 *   dq `=`.
 * - dkdv: one workgroup per (key tile of Bc keys, kv head, row b) = grid (⌈S/Bc⌉, Hkv, B). It keeps k and
 *   v of its keys in workgroup memory and walks the G query heads of its kv head and the query tiles of
 *   Br rows the causal and window bounds leave: per query tile, q, dout, lse and D into workgroup memory,
 *   each thread its RPT keys × Br/TPR queries block of p and ds into workgroup memory, then dv += p·dout
 *   and dk += ds·q on its RPT×(hd/TPR) blocks in registers; dk and dv are written once (`=`), with no
 *   atomics (WGSL has no float atomics).
 *
 * Register blocking: thread (g, t) of a workgroup, g = ⌊li / TPR⌋ and t = li mod TPR, owns the RPT tile
 * rows g·RPT … g·RPT + RPT − 1 (queries in forward and dq, keys in dkdv), the Bc/TPR keys (Br/TPR queries
 * in dkdv) c ≡ t (mod TPR) of the score block, and the output vec4s d4 ≡ t (mod TPR). Per vec4 of hd the
 * score block loads RPT + Bc/TPR vec4s of workgroup memory for RPT·Bc/TPR vec4 dot products, and the
 * accumulation loads RPT p and hd/(4·TPR) vec4s per key for RPT·hd/(4·TPR) vec4 multiply-adds. Tile rows
 * are padded by one vec4 when hd/4 is a multiple of 4 (≥ 8), so that threads reading one column of
 * consecutive rows meet different banks. p and ds tiles hold each thread's RPT entries contiguously (as
 * vec4 when RPT is a multiple of 4).
 *
 * Precision: the workgroup tile of q, k, v or dout is f16 where that tensor is f16 (the forward's shared
 * k-then-v tile where both are), widened to f32 when read, else f32; scores, softmax state, p, ds and every
 * sum are f32. Each sum runs in a fixed order (hd in order, keys or queries of a tile in order, tiles in
 * order), so equal inputs give equal bits. Loops over hd and over a tile's keys or queries have constant
 * bounds, or in rolled variants (CPU adapters) bounds plus the uniform `zero`, so that LLVM keeps them rolled.
 * Masked scores hold the finite sentinel MASKED (WGSL has no infinity literal, and shader compilers may
 * assume finite floats); a row with every score so far masked keeps m = MASKED, l = 0, acc = 0, and its
 * p are 0, never exp(MASKED − MASKED).
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

/**
 * One kernel's tile. Forward and dq: Br query rows per workgroup, key tiles of Bc keys, (Br/RPT)·TPR
 * threads. dkdv: Bc keys per workgroup, query tiles of Br rows, (Bc/RPT)·TPR threads. TPR threads share
 * each group of RPT rows (queries; keys in dkdv) and split the other side of the score tile and hd.
 */
export interface AttentionTile {
  BR: number;
  BC: number;
  TPR: number;
  /** Tile rows per thread: queries (forward, dq) or keys (dkdv); default 1. */
  RPT?: number;
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
  return Math.ceil((13 + buffers) / 4) * 16;
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
 * k_hi, zero, then `at` = the first token of the chunk bound at each storage binding, in binding order.
 */
export function attentionChunkUniforms(
  p: { S: number; H: number; Hkv: number; window: number; scale: number; n?: number },
  d: ChunkDispatch,
  at: readonly number[],
): Uint32Array {
  const u = new Uint32Array(attentionChunkUniformBytes(at.length) / 4);
  u.set(attentionUniforms(p).subarray(0, 6));
  u.set([d.row0, d.tile0, d.qLo, d.qHi, d.kLo, d.kHi, 0, ...at], 6);
  return u;
}

/** A tile with RPT filled in. */
function full(t: AttentionTile): Required<AttentionTile> {
  return { BR: t.BR, BC: t.BC, TPR: t.TPR, RPT: t.RPT ?? 1 };
}

/** The tile's split: rows = the side RPT divides (Br, or Bc in dkdv), cols = the side TPR divides. */
function sides(kernel: AttentionKernel, t: AttentionTile): { rows: number; cols: number } {
  return kernel === "dkdv" ? { rows: t.BC, cols: t.BR } : { rows: t.BR, cols: t.BC };
}

/**
 * Row stride of a q, k, v or dout tile in workgroup memory, in vec4s: hd/4, plus one when hd/4 is a
 * multiple of 4 from 8 up, so that threads reading one column of consecutive rows meet different banks.
 */
export function attentionRowStride(hd: number): number {
  const HD4 = hd / 4;
  return HD4 >= 8 && HD4 % 4 === 0 ? HD4 + 1 : HD4;
}

/**
 * Workgroup storage types of the q, k, v and dout tiles: f16 where that tensor is f16 (half the bytes,
 * widened to f32 when read), else f32; absent: f32. The forward's one k-then-v tile is f16 when both are.
 */
export interface AttentionTileFloats {
  q?: AttentionFloat;
  k?: AttentionFloat;
  v?: AttentionFloat;
  dout?: AttentionFloat;
}

/** Storage type of each workgroup tile by its name in the templates. */
function tileTypes(f: AttentionTileFloats): Record<"Qs" | "KVs" | "Ks" | "Vs" | "dOs", AttentionFloat> {
  const t = (x: AttentionFloat | undefined): AttentionFloat => x === "f16" ? "f16" : "f32";
  return {
    Qs: t(f.q),
    Ks: t(f.k),
    Vs: t(f.v),
    KVs: f.k === "f16" && f.v === "f16" ? "f16" : "f32",
    dOs: t(f.dout),
  };
}

/**
 * Bytes of workgroup memory of a kernel: its q, k, v, dout tiles (padded rows, each f16 or f32 as
 * `floats` says; one type for all when a string), the f32 p / ds tiles and row statistics, and the
 * tile-skip flags.
 */
export function attentionSharedBytes(
  kernel: AttentionKernel,
  hd: number,
  tile: AttentionTile,
  floats: AttentionFloat | AttentionTileFloats = "f32",
): number {
  const t = full(tile);
  const f = tileTypes(
    typeof floats === "string" ? { q: floats, k: floats, v: floats, dout: floats } : floats,
  );
  const row = (x: AttentionFloat) => attentionRowStride(hd) * (x === "f16" ? 8 : 16);
  switch (kernel) {
    case "forward": // Qs[Br], KVs[Bc] (k, then v); Ps[Bc·Br], Ms[Br·TPR]
      return t.BR * row(f.Qs) + t.BC * row(f.KVs) + 4 * (t.BR * t.BC + t.BR * t.TPR) + 8;
    case "dq": // Qs, dOs [Br]; Ks, Vs [Bc]; dSs[Bc·Br]
      return t.BR * (row(f.Qs) + row(f.dOs)) + t.BC * (row(f.Ks) + row(f.Vs)) + 4 * t.BR * t.BC + 8;
    case "dkdv": // Ks, Vs [Bc]; Qs, dOs [Br]; Ps, dSs [Br·Bc]; Ls, Ds [Br]
      return t.BR * (row(f.Qs) + row(f.dOs)) + t.BC * (row(f.Ks) + row(f.Vs)) +
        4 * (2 * t.BR * t.BC + 2 * t.BR) + 8;
  }
}

/** Invocations per workgroup of a kernel: (rows / RPT)·TPR. */
export function attentionThreads(kernel: AttentionKernel, tile: AttentionTile): number {
  const t = full(tile);
  return (sides(kernel, t).rows / t.RPT) * t.TPR;
}

/**
 * f32 values one thread keeps live in the inner loops: output accumulators (RPT·hd/TPR, twice in
 * dkdv), the score block (RPT·cols/TPR, twice for s and dp in dq and dkdv) and the vec4 operands.
 */
export function attentionRegisters(kernel: AttentionKernel, hd: number, tile: AttentionTile): number {
  const t = full(tile);
  const perRow = sides(kernel, t).cols / t.TPR;
  const acc = (t.RPT * hd) / t.TPR;
  const pairs = kernel === "forward" ? 1 : 2;
  return (kernel === "dkdv" ? 2 : 1) * acc + pairs * (t.RPT * perRow + 4 * (t.RPT + perRow));
}

/** Checks the template's rules for a tile and head dim. */
export function checkAttentionTile(kernel: AttentionKernel, hd: number, tile: AttentionTile): void {
  const t = full(tile);
  const { rows, cols } = sides(kernel, t);
  const ok = hd % 4 === 0 && [t.BR, t.BC, t.TPR, t.RPT].every((x) => Number.isInteger(x) && x > 0) &&
    (hd / 4) % t.TPR === 0 && cols % t.TPR === 0 && rows % t.RPT === 0;
  if (!ok) {
    const [r, c] = kernel === "dkdv" ? ["Bc", "Br"] : ["Br", "Bc"];
    throw new RangeError(
      `Cannot build attention ${kernel} tile ${
        JSON.stringify(tile)
      } for hd ${hd}: hd must be a multiple of 4, ` +
        `hd/4 and ${c} multiples of TPR, and ${r} a multiple of RPT`,
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
  /** Keep the loops over hd and over a tile's keys or queries rolled (see {@link attentionLoopBound}). */
  rolled?: boolean;
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
  /** Keep the loops over hd and over a tile's keys or queries rolled (see {@link attentionLoopBound}). */
  rolled?: boolean;
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
// zero is always 0: added to the loop bounds of rolled variants.
struct Params { S: u32, H: u32, Hkv: u32, window: u32, scale: f32, n: u32, zero: u32, pad1: u32 }
// Score of a masked (query, key) pair: finite, below any real score.
const MASKED: f32 = -3.0e38;`;

/** The uniform block of a chunked variant: HEADER's fields, the dispatch's ranges, and at_X per binding. */
function chunkHeader(list: Binding[]): string {
  return `
struct Params {
  S: u32, H: u32, Hkv: u32, window: u32, scale: f32, n: u32, row0: u32, tile0: u32,
  q_lo: u32, q_hi: u32, k_lo: u32, k_hi: u32, // this dispatch's queries and keys, as tokens of T
  zero: u32, // always 0: added to the loop bounds of rolled variants
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

/** 0 … n − 1. */
function seq(n: number): number[] {
  return Array.from({ length: n }, (_, k) => k);
}

/** Lines `f(0) … f(n − 1)` joined by newlines: the unrolled per-thread lines of a kernel. */
function unroll(n: number, f: (k: number) => string): string {
  return seq(n).map(f).join("\n");
}

/** `max(x0, max(x1, …))` of the given expressions. */
function maxOf(xs: string[]): string {
  return xs.reduceRight((acc, x) => (acc === "" ? x : `max(${x}, ${acc})`), "");
}

/** Sizes every template derives from its variant. */
interface Layout {
  HD4: number;
  /** Row stride of the q, k, v, dout tiles in vec4s. */
  HS: number;
  BR: number;
  BC: number;
  TPR: number;
  RPT: number;
  /** Score-block entries per thread on the TPR-split side: Bc/TPR (forward, dq) or Br/TPR (dkdv). */
  RK: number;
  /** Output vec4s per thread and row: hd/(4·TPR). */
  N: number;
  THREADS: number;
  /** Workgroup storage type of each q, k, v, dout tile, by name. */
  st: Record<string, AttentionFloat>;
  rolled: boolean;
}

/**
 * The bound `n` of an inner loop (over hd, or a tile's keys or queries) in WGSL: the constant, or in a
 * rolled variant `n + u.zero`, which the shader compiler cannot see as a constant and so does not unroll
 * fully. On CPU adapters (lavapipe, llvmpipe: LLVM) fully unrolled loops compile for longer (the attention
 * tests' kernels: 63 s against 45 s, cold) and run no faster; GPUs keep the constant.
 */
export function attentionLoopBound(n: number, rolled: boolean): string {
  return rolled ? `${n}u + u.zero` : `${n}u`;
}

function layoutOf(
  kernel: AttentionKernel,
  hd: number,
  tile: AttentionTile,
  floats: AttentionTileFloats,
  rolled = false,
): Layout {
  checkAttentionTile(kernel, hd, tile);
  const t = full(tile);
  const { cols } = sides(kernel, t);
  return {
    HD4: hd / 4,
    HS: attentionRowStride(hd),
    BR: t.BR,
    BC: t.BC,
    TPR: t.TPR,
    RPT: t.RPT,
    RK: cols / t.TPR,
    N: hd / 4 / t.TPR,
    THREADS: attentionThreads(kernel, t),
    st: tileTypes(floats),
    rolled,
  };
}

/** A value read from workgroup tile `shared`, widened to f32. */
function widen(L: Layout, shared: string, value: string): string {
  return L.st[shared] === "f16" ? `vec4<f32>(${value})` : value;
}

/**
 * Lines copying positions p0 … p0 + rows − 1 of the tensors in `pairs` (head `head` of `heads`) into their
 * workgroup tiles, row r at r·HS; zero where `inRange(pos)` fails.
 */
function loadTiles(
  R: Rows,
  L: Layout,
  pairs: [tensor: string, shared: string][],
  rows: number,
  p0: string,
  inRange: (pos: string) => string,
  heads: string,
  head: string,
  indent: string,
): string {
  const i = indent;
  const lines = [
    `${i}for (var s = li; s < ${rows * L.HD4}u; s += ${L.THREADS}u) {`,
    `${i}  let row = s / ${L.HD4}u;`,
    `${i}  let col = s % ${L.HD4}u;`,
    `${i}  let pos = ${p0} + row;`,
    `${i}  let in_range = ${inRange("pos")};`,
  ];
  for (const [X, shared] of pairs) {
    lines.push(
      `${i}  var x_${X} = vec4<${L.st[shared]}>(0.0);`,
      `${i}  if (in_range) { x_${X} = vec4<${L.st[shared]}>(${X}[((${
        R.tok(X, "pos")
      }) * ${heads} + ${head}) * ${L.HD4}u + col]); }`,
      `${i}  ${shared}[row * ${L.HS}u + col] = x_${X};`,
    );
  }
  lines.push(`${i}}`);
  return lines.join("\n");
}

/**
 * A copy of `rows` positions of tensor X into workgroup tile `shared` in two halves, so that the global
 * loads can be issued early (their latency hidden behind other work) and stored after a barrier: `fetch`
 * reads this thread's ⌈rows·hd/4 / threads⌉ vec4s into registers (zero where `inRange(pos)` fails),
 * `store` writes them to the tile.
 */
function prefetchTile(
  R: Rows,
  L: Layout,
  [X, shared]: [tensor: string, shared: string],
  rows: number,
  p0: string,
  inRange: (pos: string) => string,
  heads: string,
  head: string,
  indent: string,
): { fetch: string; store: string } {
  const i = indent;
  const slots = rows * L.HD4;
  const per = Math.ceil(slots / L.THREADS);
  const exact = slots % L.THREADS === 0;
  const type = `vec4<${L.st[shared]}>`;
  const fetch = [
    `${i}var pf_${X}: array<${type}, ${per}>;`,
    `${i}for (var l = 0u; l < ${per}u; l++) {`,
    `${i}  let s = li + l * ${L.THREADS}u;`,
    `${i}  let pos = ${p0} + s / ${L.HD4}u;`,
    `${i}  var x = ${type}(0.0);`,
    `${i}  if (${exact ? "" : `s < ${slots}u && `}${inRange("pos")}) {`,
    `${i}    x = ${type}(${X}[((${R.tok(X, "pos")}) * ${heads} + ${head}) * ${L.HD4}u + s % ${L.HD4}u]);`,
    `${i}  }`,
    `${i}  pf_${X}[l] = x;`,
    `${i}}`,
  ];
  const put = `${shared}[s / ${L.HD4}u * ${L.HS}u + s % ${L.HD4}u] = pf_${X}[l];`;
  const store = [
    `${i}for (var l = 0u; l < ${per}u; l++) {`,
    `${i}  let s = li + l * ${L.THREADS}u;`,
    `${i}  ${exact ? put : `if (s < ${slots}u) { ${put} }`}`,
    `${i}}`,
  ];
  return { fetch: fetch.join("\n"), store: store.join("\n") };
}

/**
 * Lines of the score block: for each product `acc = A·B`, acc_a_b = Σ_d A[rowA(a)]·B[rowB(b)] over
 * the hd/4 vec4s in order, a < nA (this thread's RPT rows), b < nB (its TPR-strided entries).
 */
function blockDots(
  L: Layout,
  products: { acc: string; A: string; B: string }[],
  nA: number,
  rowA: (a: number) => string,
  nB: number,
  rowB: (b: number) => string,
  indent: string,
): string {
  const i = indent;
  const lines: string[] = [];
  for (const p of products) {
    for (const a of seq(nA)) for (const b of seq(nB)) lines.push(`${i}var ${p.acc}_${a}_${b} = 0.0;`);
  }
  lines.push(`${i}for (var d = 0u; d < ${attentionLoopBound(L.HD4, L.rolled)}; d++) {`);
  for (const p of products) {
    for (const a of seq(nA)) {
      lines.push(`${i}  let ${p.A}_${a} = ${widen(L, p.A, `${p.A}[(${rowA(a)}) * ${L.HS}u + d]`)};`);
    }
    for (const b of seq(nB)) {
      lines.push(`${i}  let ${p.B}_${b} = ${widen(L, p.B, `${p.B}[(${rowB(b)}) * ${L.HS}u + d]`)};`);
    }
    for (const a of seq(nA)) {
      for (const b of seq(nB)) lines.push(`${i}  ${p.acc}_${a}_${b} += dot(${p.A}_${a}, ${p.B}_${b});`);
    }
  }
  lines.push(`${i}}`);
  return lines.join("\n");
}

/**
 * A p or ds tile of f32 in workgroup memory, `size` entries, in which each thread's RPT entries for one
 * key (forward, dq) or query (dkdv) are contiguous: vec4s when RPT is a multiple of 4.
 */
function pTile(name: string, size: number, RPT: number) {
  const vec = RPT % 4 === 0;
  return {
    decl: vec
      ? `var<workgroup> ${name}: array<vec4<f32>, ${size / 4}>;`
      : `var<workgroup> ${name}: array<f32, ${size}>;`,
    /** A line writing `values` (RPT expressions) as the run that starts at flat index `start` (a multiple of RPT). */
    write: (start: string, values: string[], indent: string) =>
      vec
        ? seq(RPT / 4).map((k) =>
          `${indent}${name}[(${start}) / 4u + ${k}u] = vec4<f32>(${
            values.slice(4 * k, 4 * k + 4).join(", ")
          });`
        ).join("\n")
        : values.map((x, a) => `${indent}${name}[${start} + ${a}u] = ${x};`).join("\n"),
    /** Lines reading the run at `start` into `${v}_0 … ${v}_{RPT−1}`. */
    read: (start: string, v: string, indent: string) =>
      vec
        ? [
          ...seq(RPT / 4).map((k) => `${indent}let ${v}4_${k} = ${name}[(${start}) / 4u + ${k}u];`),
          ...seq(RPT).map((a) => `${indent}let ${v}_${a} = ${v}4_${a >> 2}[${a & 3}];`),
        ].join("\n")
        : seq(RPT).map((a) => `${indent}let ${v}_${a} = ${name}[${start} + ${a}u];`).join("\n"),
  };
}

/**
 * Lines of the test that ends in `continue` when no (query, key) pair of the tile is allowed (documents):
 * every thread contributes `any`, its own pairs, read back uniformly so that every barrier below stays
 * in uniform control flow. Its barrier is also the one that starts the tile.
 */
function tileSkip(any: string): string {
  return `
    // Skip the tile when no (query, key) pair of it is allowed (documents).
    if (${any}) { atomicOr(&tile_live, 1u); }
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

/**
 * `X[at + e·TPR + t] = value(e)` for a thread's vec4s e = 0 … N − 1 of one row, stored as vec4<type>;
 * with `add`, the value is added to what X holds (a gradient summed over dispatches).
 */
function storeRow(
  X: string,
  at: string,
  L: Layout,
  type: AttentionFloat,
  value: (e: number) => string,
  add: boolean,
  indent: string,
): string {
  return unroll(L.N, (e) => {
    const x = `${X}[${at} + ${e * L.TPR}u + t]`;
    return `${indent}${x} = vec4<${type}>(${add ? `vec4<f32>(${x}) + ` : ""}${value(e)});`;
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
 * Where a query-tile workgroup stands: first query q0, head h, row base, kv head, thread (g, t) and its
 * queries i_a = q0 + g·RPT + a with ok_a (a query of this dispatch) and, with documents, doc_a; in row
 * chunks also the dispatch's queries [qa, qb) of the row (a tile outside them returns).
 */
function queryTileIds(L: Layout, docs: boolean, R: Rows): string {
  const head = R.chunked
    ? `  let q0 = (u.tile0 + wg.x) * ${L.BR}u;
  let h = wg.y;
  let base = (u.row0 + wg.z) * u.S; // first token of row b
  // This dispatch's queries of row b, row-local: [qa, qb) = [q_lo, q_hi) ∩ row b.
  let qa = max(u.q_lo, base) - base;
  let qb = max(min(u.q_hi, base + u.S), base) - base;
  if (q0 + ${L.BR}u <= qa || q0 >= qb) { return; }`
    : `  let q0 = wg.x * ${L.BR}u;
  let h = wg.y;
  let base = wg.z * u.S; // first token of row b`;
  return `${head}
  let kvh = h / (u.H / u.Hkv);
  let g = li / ${L.TPR}u;
  let t = li % ${L.TPR}u;
  let qr = g * ${L.RPT}u; // this thread's first row of the tile
${unroll(L.RPT, (a) => `  let i_${a} = q0 + qr + ${a}u;\n  let ok_${a} = ${R.qIn(`i_${a}`)};`)}
${docs ? unroll(L.RPT, (a) => `  let doc_${a} = ${R.docQ(R.qClamp(`i_${a}`))};`) : ""}`;
}

/**
 * The key tiles a query tile visits, from k_start while `keyLoop(R)` holds, as the causal and window
 * bounds (and in row chunks the dispatch's keys [ka, kb)) leave them.
 */
function queryTileKeyRange(L: Layout, R: Rows): string {
  if (!R.chunked) {
    return `
  // Keys left by the causal and window bounds: [q0 + 1 − W, last query of the tile].
  let q_last = min(q0 + ${L.BR}u, u.S) - 1u;
  var k_start = 0u;
  if (u.window != 0u && q0 >= u.window) { k_start = (q0 + 1u - u.window) / ${L.BC}u * ${L.BC}u; }`;
  }
  return `
  // This dispatch's keys of row b, row-local: [ka, kb) = [k_lo, k_hi) ∩ row b.
  let ka = max(u.k_lo, base) - base;
  let kb = max(min(u.k_hi, base + u.S), base) - base;
  // Keys left by the causal and window bounds and the range: [max(ka, q0 + 1 − W), last query] ∩ [ka, kb).
  let q_last = min(q0 + ${L.BR}u, qb) - 1u;
  var k_start = ka / ${L.BC}u * ${L.BC}u;
  if (u.window != 0u && q0 >= u.window) { k_start = max(k_start, (q0 + 1u - u.window) / ${L.BC}u * ${L.BC}u); }
  let k_end = min(q_last + 1u, kb);`;
}

/** Condition of the key-tile loop of a query-tile kernel (see {@link queryTileKeyRange}). */
function keyLoop(R: Rows): string {
  return R.chunked ? "k0 < k_end" : "k0 <= q_last";
}

/**
 * Start of a key-tile iteration of a query-tile kernel: this thread's keys j_b = k0 + t + b·TPR, the masks
 * pair_a_b (allowed) of its (query a, key b) pairs, then the tile-skip test (documents) or a barrier.
 */
function keyTileEntry(L: Layout, docs: boolean, R: Rows): string {
  const lines = [unroll(L.RK, (b) => `    let j_${b} = k0 + t + ${b * L.TPR}u;`)];
  if (docs) lines.push(unroll(L.RK, (b) => `    let kdoc_${b} = ${R.docK(R.kClamp(`j_${b}`))};`));
  const masks: string[] = [];
  for (const a of seq(L.RPT)) {
    for (const b of seq(L.RK)) {
      const doc = docs ? ` && kdoc_${b} == doc_${a}` : "";
      masks.push(`    let pair_${a}_${b} = ok_${a} && ${R.kIn(`j_${b}`)} && allowed(i_${a}, j_${b})${doc};`);
    }
  }
  lines.push(masks.join("\n"));
  const all = seq(L.RPT).flatMap((a) => seq(L.RK).map((b) => `pair_${a}_${b}`));
  lines.push(docs ? tileSkip(all.join(" || ")) : "    workgroupBarrier();");
  return lines.join("\n");
}

/** WGSL of the forward kernel (see the module documentation). */
export function attentionForwardWgsl(v: ForwardVariant): string {
  const L = layoutOf("forward", v.hd, v.tile, { q: v.q, k: v.k, v: v.v }, v.rolled);
  const { HD4, HS, BR, BC, TPR, RPT, RK, N, THREADS } = L;
  const docs = v.docs !== null;
  const R = rowsOf(v.chunks);
  const list: Binding[] = [
    ["Q", vec(v.q), "read"],
    ["K", vec(v.k), "read"],
    ["V", vec(v.v), "read"],
  ];
  list.push(...docBindings(v.docs, v.chunks));
  list.push(["O", vec(v.out), "read_write"], ["LSE", "array<f32>", "read_write"]);
  const W = opening([v.q, v.k, v.v, v.out], list, R.chunked);
  const P = pTile("Ps", BC * BR, RPT);
  W.push(`
var<workgroup> Qs: array<vec4<${L.st.Qs}>, ${BR * HS}>;  // q of rows q0 .. q0 + Br, row r at r·${HS}
var<workgroup> KVs: array<vec4<${L.st.KVs}>, ${BC * HS}>; // k, then v, of keys k0 .. k0 + Bc
${P.decl} // Ps[c·Br + r] = p of (query r, key c)
var<workgroup> Ms: array<f32, ${BR * TPR}>; // Ms[r·TPR + t] = max of thread t's scores of row r`);
  if (docs) W.push(SKIP_DECLS);
  const rows = (f: (a: number) => string) => unroll(RPT, f);
  const block = (f: (a: number, e: number) => string) => unroll(RPT, (a) => unroll(N, (e) => f(a, e)));
  const outAt = (a: number) => `((${R.tok("O", `i_${a}`)}) * u.H + h) * ${HD4}u`;
  const lseAt = (a: number) => `(${R.tok("LSE", `i_${a}`)}) * u.H + h`;
  // Row chunks: continue from the state earlier key ranges left in (out, lse) (module documentation).
  const resume = R.chunked
    ? `
  // Earlier key ranges left a query's state as (o, lse) unless this range holds its first key.
${
      rows((a) =>
        `  if (ok_${a} && base + first_key(i_${a}) < u.k_lo) {
    m_${a} = LSE[${lseAt(a)}];
    if (m_${a} != MASKED) { l_${a} = 1.0; }
${unroll(N, (e) => `    acc_${a}_${e} = vec4<f32>(O[${outAt(a)} + ${e * TPR}u + t]);`)}
  }`
      )
    }
  storageBarrier(); // lse is read by every thread of a row before one of them writes it`
    : "";
  const store = (a: number) =>
    R.chunked
      ? `  if (ok_${a}) {
    // A query with no allowed key so far keeps the empty state: out = 0, lse = MASKED.
    var inv = 0.0;
    var lse = MASKED;
    if (l_${a} > 0.0) {
      inv = 1.0 / l_${a};
      lse = m_${a} + log(l_${a});
    }
${storeRow("O", outAt(a), L, v.out, (e) => `acc_${a}_${e} * inv`, false, "    ")}
    if (t == 0u) { LSE[${lseAt(a)}] = lse; }
  }`
      : `  if (ok_${a}) {
    let inv = 1.0 / l_${a};
${storeRow("O", outAt(a), L, v.out, (e) => `acc_${a}_${e} * inv`, false, "    ")}
    if (t == 0u) { LSE[${lseAt(a)}] = m_${a} + log(l_${a}); }
  }`;
  const keyRows = (b: number) => `t + ${b * TPR}u`;
  const vTile = prefetchTile(R, L, ["V", "KVs"], BC, "k0", R.kIn, "u.Hkv", "kvh", "    ");
  W.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
${queryTileIds(L, docs, R)}
${loadTiles(R, L, [["Q", "Qs"]], BR, "q0", R.qIn, "u.H", "h", "  ")}
${queryTileKeyRange(L, R)}
${rows((a) => `  var m_${a} = MASKED;\n  var l_${a} = 0.0;`)}
${block((a, e) => `  var acc_${a}_${e} = vec4<f32>(0.0);`)}${resume}
  for (var k0 = k_start; ${keyLoop(R)}; k0 += ${BC}u) {
${keyTileEntry(L, docs, R)}
${loadTiles(R, L, [["K", "KVs"]], BC, "k0", R.kIn, "u.Hkv", "kvh", "    ")}
    // v is read now and stored once k is no longer needed, so its loads overlap the scores.
${vTile.fetch}
    workgroupBarrier();
    // Scores s = scale·q·k of this thread's rows and keys (MASKED where not allowed), and their row max.
${blockDots(L, [{ acc: "s", A: "Qs", B: "KVs" }], RPT, (a) => `qr + ${a}u`, RK, keyRows, "    ")}
${rows((a) => unroll(RK, (b) => `    s_${a}_${b} = select(MASKED, s_${a}_${b} * u.scale, pair_${a}_${b});`))}
${rows((a) => `    Ms[(qr + ${a}u) * ${TPR}u + t] = ${maxOf(seq(RK).map((b) => `s_${a}_${b}`))};`)}
    workgroupBarrier();
${vTile.store}
    // Row max over the TPR threads of the row group; then p = exp(s − m_new) once per pair.
${rows((a) => `    var mn_${a} = m_${a};`)}
    for (var x = 0u; x < ${TPR}u; x++) {
${rows((a) => `      mn_${a} = max(mn_${a}, Ms[(qr + ${a}u) * ${TPR}u + x]);`)}
    }
${
    unroll(RK, (b) =>
      rows((a) =>
        `    let p_${a}_${b} = select(0.0, exp(s_${a}_${b} - mn_${a}), pair_${a}_${b});`
      ) + "\n" +
      P.write(`(${keyRows(b)}) * ${BR}u + qr`, seq(RPT).map((a) => `p_${a}_${b}`), "    "))
  }
    workgroupBarrier();
    // Online softmax: rescale what was summed under the old max, then add p·v and p over the tile's keys.
${
    rows((a) =>
      `    let alpha_${a} = exp(m_${a} - mn_${a});\n    l_${a} *= alpha_${a};\n    m_${a} = mn_${a};\n` +
      unroll(N, (e) => `    acc_${a}_${e} *= alpha_${a};`)
    )
  }
    for (var c = 0u; c < ${attentionLoopBound(BC, L.rolled)}; c++) {
${P.read(`c * ${BR}u + qr`, "p", "      ")}
${unroll(N, (e) => `      let v_${e} = ${widen(L, "KVs", `KVs[c * ${HS}u + ${e * TPR}u + t]`)};`)}
${rows((a) => `      l_${a} += p_${a};`)}
${block((a, e) => `      acc_${a}_${e} = fma(vec4<f32>(p_${a}), v_${e}, acc_${a}_${e});`)}
    }
  }
${rows(store)}
}`);
  return W.join("\n");
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
  const L = layoutOf("dq", v.hd, v.tile, { q: v.q, k: v.k, v: v.v, dout: v.dout }, v.rolled);
  const { HD4, HS, BR, BC, TPR, RPT, RK, N, THREADS } = L;
  const docs = v.docs !== null;
  const R = rowsOf(v.chunks);
  const list = backwardInputs(v);
  list.push(["DQ", vec(v.grad), "read_write"]);
  const W = opening([v.q, v.k, v.v, v.dout, v.grad], list, R.chunked);
  const DS = pTile("dSs", BC * BR, RPT);
  W.push(`
var<workgroup> Qs: array<vec4<${L.st.Qs}>, ${BR * HS}>;  // q of rows q0 .. q0 + Br, row r at r·${HS}
var<workgroup> dOs: array<vec4<${L.st.dOs}>, ${BR * HS}>; // dout of rows q0 .. q0 + Br
var<workgroup> Ks: array<vec4<${L.st.Ks}>, ${BC * HS}>;  // k of keys k0 .. k0 + Bc
var<workgroup> Vs: array<vec4<${L.st.Vs}>, ${BC * HS}>;  // v of keys k0 .. k0 + Bc
${DS.decl} // dSs[c·Br + r] = ds of (query r, key c), 0 where masked`);
  if (docs) W.push(SKIP_DECLS);
  const rows = (f: (a: number) => string) => unroll(RPT, f);
  const block = (f: (a: number, e: number) => string) => unroll(RPT, (a) => unroll(N, (e) => f(a, e)));
  const dqAt = (a: number) => `((${R.tok("DQ", `i_${a}`)}) * u.H + h) * ${HD4}u`;
  const value = (a: number) => (e: number) => `acc_${a}_${e} * u.scale`;
  // Row chunks: dq starts in the key range that holds the query's first key and adds in later ones.
  const store = (a: number) =>
    R.chunked
      ? `  if (ok_${a}) {
    if (base + first_key(i_${a}) >= u.k_lo) {
${storeRow("DQ", dqAt(a), L, v.grad, value(a), false, "      ")}
    } else {
${storeRow("DQ", dqAt(a), L, v.grad, value(a), true, "      ")}
    }
  }`
      : `  if (ok_${a}) {
${storeRow("DQ", dqAt(a), L, v.grad, value(a), false, "    ")}
  }`;
  const keyRows = (b: number) => `t + ${b * TPR}u`;
  W.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
${queryTileIds(L, docs, R)}
${loadTiles(R, L, [["Q", "Qs"], ["DO", "dOs"]], BR, "q0", R.qIn, "u.H", "h", "  ")}
${rows((a) => `  let st_${a} = STATS[(${R.tok("STATS", R.qClamp(`i_${a}`))}) * u.H + h]; // (lse, D)`)}
${queryTileKeyRange(L, R)}
${block((a, e) => `  var acc_${a}_${e} = vec4<f32>(0.0);`)}
  for (var k0 = k_start; ${keyLoop(R)}; k0 += ${BC}u) {
${keyTileEntry(L, docs, R)}
${loadTiles(R, L, [["K", "Ks"], ["V", "Vs"]], BC, "k0", R.kIn, "u.Hkv", "kvh", "    ")}
    workgroupBarrier();
    // ds = p·(dout·v − D), p = exp(scale·q·k − lse); 0 where masked.
${
    blockDots(
      L,
      [{ acc: "s", A: "Qs", B: "Ks" }, { acc: "dp", A: "dOs", B: "Vs" }],
      RPT,
      (a) => `qr + ${a}u`,
      RK,
      keyRows,
      "    ",
    )
  }
${
    unroll(RK, (b) =>
      rows((a) =>
        `    let ds_${a}_${b} = exp(select(MASKED, s_${a}_${b} * u.scale - st_${a}.x, pair_${a}_${b})) * ` +
        `(dp_${a}_${b} - st_${a}.y);`
      ) + "\n" +
      DS.write(
        `(${keyRows(b)}) * ${BR}u + qr`,
        seq(RPT).map((a) =>
          `ds_${a}_${b}`
        ),
        "    ",
      ))
  }
    workgroupBarrier();
    for (var c = 0u; c < ${attentionLoopBound(BC, L.rolled)}; c++) {
${DS.read(`c * ${BR}u + qr`, "ds", "      ")}
${unroll(N, (e) => `      let k_${e} = ${widen(L, "Ks", `Ks[c * ${HS}u + ${e * TPR}u + t]`)};`)}
${block((a, e) => `      acc_${a}_${e} = fma(vec4<f32>(ds_${a}), k_${e}, acc_${a}_${e});`)}
    }
  }
${rows(store)}
}`);
  return W.join("\n");
}

/** WGSL of the dkdv kernel (see the module documentation). */
export function attentionDkdvWgsl(v: BackwardVariant): string {
  const L = layoutOf("dkdv", v.hd, v.tile, { q: v.q, k: v.k, v: v.v, dout: v.dout }, v.rolled);
  const { HD4, HS, BR, BC, TPR, RPT, RK, N, THREADS } = L;
  const docs = v.docs !== null;
  const R = rowsOf(v.chunks);
  const list = backwardInputs(v);
  list.push(["DK", vec(v.grad), "read_write"], ["DV", vec(v.grad), "read_write"]);
  const W = opening([v.q, v.k, v.v, v.dout, v.grad], list, R.chunked);
  const P = pTile("Ps", BR * BC, RPT);
  const DS = pTile("dSs", BR * BC, RPT);
  W.push(`
var<workgroup> Ks: array<vec4<${L.st.Ks}>, ${BC * HS}>;  // k of keys k0 .. k0 + Bc, row c at c·${HS}
var<workgroup> Vs: array<vec4<${L.st.Vs}>, ${BC * HS}>;  // v of keys k0 .. k0 + Bc
var<workgroup> Qs: array<vec4<${L.st.Qs}>, ${BR * HS}>;  // q of rows q0 .. q0 + Br (head h)
var<workgroup> dOs: array<vec4<${L.st.dOs}>, ${BR * HS}>; // dout of rows q0 .. q0 + Br (head h)
${P.decl} // Ps[r·Bc + c] = p of (query r, key c), 0 where masked
${DS.decl} // dSs[r·Bc + c] = ds of (query r, key c), 0 where masked
var<workgroup> Ls: array<f32, ${BR}>; // lse of rows q0 .. q0 + Br
var<workgroup> Ds: array<f32, ${BR}>; // D of rows q0 .. q0 + Br`);
  if (docs) W.push(SKIP_DECLS);
  const keys = (f: (a: number) => string) => unroll(RPT, f);
  const block = (f: (a: number, e: number) => string) => unroll(RPT, (a) => unroll(N, (e) => f(a, e)));
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
  const at = (X: string, a: number) => `((${R.tok(X, `j_${a}`)}) * u.Hkv + kvh) * ${HD4}u`;
  const dk = (a: number) => (e: number) => `dk_${a}_${e} * u.scale`;
  const dv = (a: number) => (e: number) => `dv_${a}_${e}`;
  // Row chunks: dk and dv start in the query range that holds key j (its first query) and add in later ones.
  const store = (a: number) =>
    R.chunked
      ? `  if (kok_${a}) {
    if (base + j_${a} >= u.q_lo) {
${storeRow("DK", at("DK", a), L, v.grad, dk(a), false, "      ")}
${storeRow("DV", at("DV", a), L, v.grad, dv(a), false, "      ")}
    } else {
${storeRow("DK", at("DK", a), L, v.grad, dk(a), true, "      ")}
${storeRow("DV", at("DV", a), L, v.grad, dv(a), true, "      ")}
    }
  }`
      : `  if (kok_${a}) {
${storeRow("DK", at("DK", a), L, v.grad, dk(a), false, "    ")}
${storeRow("DV", at("DV", a), L, v.grad, dv(a), false, "    ")}
  }`;
  const queryRows = (b: number) => `t + ${b * TPR}u`;
  const masks: string[] = [];
  for (const a of seq(RPT)) {
    for (const b of seq(RK)) {
      const doc = docs ? ` && qdoc_${b} == doc_${a}` : "";
      masks.push(
        `      let pair_${a}_${b} = kok_${a} && ${R.qIn(`i_${b}`)} && allowed(i_${b}, j_${a})${doc};`,
      );
    }
  }
  const all = seq(RPT).flatMap((a) => seq(RK).map((b) => `pair_${a}_${b}`));
  W.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
${head}
  let G = u.H / u.Hkv;
  let g = li / ${TPR}u;
  let t = li % ${TPR}u;
  let kc = g * ${RPT}u; // this thread's first key of the tile
${keys((a) => `  let j_${a} = k0 + kc + ${a}u;\n  let kok_${a} = ${R.kIn(`j_${a}`)};`)}
${docs ? keys((a) => `  let doc_${a} = ${R.docK(R.kClamp(`j_${a}`))};`) : ""}
${loadTiles(R, L, [["K", "Ks"], ["V", "Vs"]], BC, "k0", R.kIn, "u.Hkv", "kvh", "  ")}
${queries}
${block((a, e) => `  var dk_${a}_${e} = vec4<f32>(0.0);\n  var dv_${a}_${e} = vec4<f32>(0.0);`)}
  for (var gh = 0u; gh < G; gh++) {
    let h = kvh * G + gh;
    for (var q0 = q_start; ${R.chunked ? "q0 < q_end" : "q0 <= q_last"}; q0 += ${BR}u) {
${unroll(RK, (b) => `      let i_${b} = q0 + ${queryRows(b)};`)}
${docs ? unroll(RK, (b) => `      let qdoc_${b} = ${R.docQ(R.qClamp(`i_${b}`))};`) : ""}
${masks.join("\n")}
${docs ? tileSkip(all.join(" || ")).replaceAll("\n    ", "\n      ") : "      workgroupBarrier();"}
${loadTiles(R, L, [["Q", "Qs"], ["DO", "dOs"]], BR, "q0", R.qIn, "u.H", "h", "      ")}
      for (var s = li; s < ${BR}u; s += ${THREADS}u) {
        let ii = q0 + s;
        var st = vec2<f32>(0.0);
        if (${R.qIn("ii")}) { st = STATS[(${R.tok("STATS", "ii")}) * u.H + h]; }
        Ls[s] = st.x;
        Ds[s] = st.y;
      }
      workgroupBarrier();
      // p = exp(scale·q·k − lse), ds = p·(dout·v − D) of this thread's keys and queries; 0 where masked.
${
    blockDots(
      L,
      [{ acc: "s", A: "Ks", B: "Qs" }, { acc: "dp", A: "Vs", B: "dOs" }],
      RPT,
      (a) => `kc + ${a}u`,
      RK,
      queryRows,
      "      ",
    )
  }
${
    unroll(RK, (b) =>
      `      let lse_${b} = Ls[${queryRows(b)}];\n      let dd_${b} = Ds[${queryRows(b)}];\n` +
      keys((a) =>
        `      let p_${a}_${b} = exp(select(MASKED, s_${a}_${b} * u.scale - lse_${b}, pair_${a}_${b}));\n` +
        `      let ds_${a}_${b} = p_${a}_${b} * (dp_${a}_${b} - dd_${b});`
      ) + "\n" +
      P.write(`(${queryRows(b)}) * ${BC}u + kc`, seq(RPT).map((a) => `p_${a}_${b}`), "      ") + "\n" +
      DS.write(`(${queryRows(b)}) * ${BC}u + kc`, seq(RPT).map((a) => `ds_${a}_${b}`), "      "))
  }
      workgroupBarrier();
      for (var r = 0u; r < ${attentionLoopBound(BR, L.rolled)}; r++) {
${P.read(`r * ${BC}u + kc`, "p", "        ")}
${DS.read(`r * ${BC}u + kc`, "ds", "        ")}
${unroll(N, (e) => `        let q_${e} = ${widen(L, "Qs", `Qs[r * ${HS}u + ${e * TPR}u + t]`)};`)}
${unroll(N, (e) => `        let do_${e} = ${widen(L, "dOs", `dOs[r * ${HS}u + ${e * TPR}u + t]`)};`)}
${block((a, e) => `        dv_${a}_${e} = fma(vec4<f32>(p_${a}), do_${e}, dv_${a}_${e});`)}
${block((a, e) => `        dk_${a}_${e} = fma(vec4<f32>(ds_${a}), q_${e}, dk_${a}_${e});`)}
      }
    }
  }
${keys(store)}
}`);
  return W.join("\n");
}
