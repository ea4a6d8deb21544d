/**
 * The attention kernels as they were before register blocking, kept as the benchmark's reference
 * (bench/attention.ts): forward, dq and dkdv on whole tensors (no row chunks), with GQA, a sliding
 * window and documents, in f32 or f16, and the tile choice of that version. Nothing else uses them.
 *
 * B = rows, S = tokens per row, T = B·S, H = query heads, Hkv = kv heads, G = H / Hkv, hd = head dim.
 * One workgroup holds Br query rows (forward, dq) or Bc keys (dkdv) with TPR threads per row or key;
 * a thread computes the scores of keys c ≡ t (mod TPR) as full hd-long dot products from workgroup
 * memory (two vec4 loads per vec4 multiply-add) and owns the output vec4s d4 ≡ t (mod TPR).
 * Workgroup memory is f32 for every input dtype.
 * @module
 */
import type { Gpu } from "../kernels/device.ts";
import { getKernel } from "../kernels/pipeline.ts";
import { recorder } from "../kernels/recorder.ts";
import { Tensor } from "../kernels/tensor.ts";

type Float = "f32" | "f16";
type Kind = "forward" | "dq" | "dkdv";

/** Br query rows, Bc keys, TPR threads per row (forward, dq) or key (dkdv). */
export interface PreviousTile {
  BR: number;
  BC: number;
  TPR: number;
}

/** Masks and sizes of a call (as attentionForward's options, without row chunks). */
export interface PreviousOptions {
  S: number;
  window?: number | null;
  docs?: Tensor | null;
}

const TILE_SIZES = [64, 32, 16, 8, 4, 2];
const GL_STORAGE_BYTES = 2048;

function sharedWords(kind: Kind, hd: number, t: PreviousTile): number {
  switch (kind) {
    case "forward":
      return (t.BR + t.BC) * hd + t.BR * t.BC + 2 * t.BR * t.TPR;
    case "dq":
      return 2 * (t.BR + t.BC) * hd + t.BR * t.BC;
    case "dkdv":
      return 2 * (t.BR + t.BC) * hd + 2 * t.BR * t.BC + 2 * t.BR;
  }
}

function threadsOf(kind: Kind, t: PreviousTile): number {
  return (kind === "dkdv" ? t.BC : t.BR) * t.TPR;
}

/** The previous version's tile choice: the largest min(Br, Bc), then Br·Bc, within memory and 256 threads. */
export function previousTile(gpu: Gpu, kind: Kind, hd: number): PreviousTile {
  let TPR = 1;
  while (TPR * 2 <= 16 && (hd / 4) % (TPR * 2) === 0) TPR *= 2;
  const storage = gpu.limits.maxComputeWorkgroupStorageSize;
  const threads = Math.min(256, gpu.limits.maxComputeInvocationsPerWorkgroup);
  const rank = (t: PreviousTile) => [Math.min(t.BR, t.BC), t.BR * t.BC, kind === "dkdv" ? t.BC : t.BR];
  const greater = (a: number[], b: number[]) => {
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] > b[i];
    return false;
  };
  const gl = gpu.info.backend.split(",")[0] === "gl";
  for (let budget = gl ? Math.min(GL_STORAGE_BYTES, storage) : storage; budget <= storage; budget *= 2) {
    let found: PreviousTile | null = null;
    for (const BR of TILE_SIZES) {
      for (const BC of TILE_SIZES) {
        const tile = { BR, BC, TPR };
        if (threadsOf(kind, tile) > threads || 4 * sharedWords(kind, hd, tile) + 8 > budget) continue;
        if (found === null || greater(rank(tile), rank(found))) found = tile;
      }
    }
    if (found !== null) return found;
    if (budget === storage) break;
    if (budget * 2 > storage) budget = storage / 2;
  }
  throw new RangeError(`Cannot run the previous attention ${kind} with head dim ${hd}: no tile fits`);
}

const HEADER = `
struct Params { S: u32, H: u32, Hkv: u32, window: u32, scale: f32, n: u32, pad0: u32, pad1: u32 }
const MASKED: f32 = -3.0e38;
fn allowed(i: u32, j: u32) -> bool {
  return j <= i && (u.window == 0u || j + u.window > i);
}`;

type Binding = [name: string, type: string, access: "read" | "read_write"];

function opening(dtypes: Float[], list: Binding[]): string[] {
  const lines = [dtypes.includes("f16") ? "enable f16;" : "", HEADER];
  list.forEach(([name, type, access], i) =>
    lines.push(`@group(0) @binding(${i}) var<storage, ${access}> ${name}: ${type};`)
  );
  lines.push(`@group(0) @binding(${list.length}) var<uniform> u: Params;`);
  return lines;
}

const vec = (t: Float) => `array<vec4<${t}>>`;
const unroll = (n: number, f: (k: number) => string) => Array.from({ length: n }, (_, k) => f(k)).join("\n");

function tileSkip(pairs: string, cond: string): string {
  return `
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

function queryTileHead(BR: number, BC: number, TPR: number, docs: boolean): string {
  return `  let q0 = wg.x * ${BR}u;
  let h = wg.y;
  let base = wg.z * u.S;
  let kvh = h / (u.H / u.Hkv);
  let r = li / ${TPR}u;
  let t = li % ${TPR}u;
  let i = q0 + r;
  let row_ok = i < u.S;
  ${docs ? "let doc_i = DOC[base + min(i, u.S - 1u)];" : ""}
  let q_last = min(q0 + ${BR}u, u.S) - 1u;
  var k_start = 0u;
  if (u.window != 0u && q0 >= u.window) { k_start = (q0 + 1u - u.window) / ${BC}u * ${BC}u; }`;
}

function keyTileEntry(BC: number, TPR: number, docs: boolean): string {
  return docs
    ? tileSkip(
      `for (var c = t; c < ${BC}u; c += ${TPR}u)`,
      `row_ok && k0 + c < u.S && allowed(i, k0 + c) && DOC[base + k0 + c] == doc_i`,
    )
    : "workgroupBarrier();";
}

function loadPair(A: string, B: string, pos: string, heads: string, head: string, HD4: number, scaleA = "") {
  return `    var x = vec4<f32>(0.0);
    var y = vec4<f32>(0.0);
    if (${pos} < u.S) {
      let o = ((base + ${pos}) * ${heads} + ${head}) * ${HD4}u + s % ${HD4}u;
      x = vec4<f32>(${A}[o])${scaleA};
      y = vec4<f32>(${B}[o]);
    }`;
}

interface Variant {
  hd: number;
  tile: PreviousTile;
  q: Float;
  k: Float;
  v: Float;
  dout: Float;
  out: Float;
  grad: Float;
  docs: "u32" | "i32" | null;
}

function forwardWgsl(v: Variant): string {
  const { hd } = v;
  const { BR, BC, TPR } = v.tile;
  const HD4 = hd / 4;
  const N = HD4 / TPR;
  const THREADS = BR * TPR;
  const docs = v.docs !== null;
  const list: Binding[] = [["Q", vec(v.q), "read"], ["K", vec(v.k), "read"], ["V", vec(v.v), "read"]];
  if (v.docs) list.push(["DOC", `array<${v.docs}>`, "read"]);
  list.push(["O", vec(v.out), "read_write"], ["LSE", "array<f32>", "read_write"]);
  const L = opening([v.q, v.k, v.v, v.out], list);
  L.push(`
var<workgroup> Qs: array<vec4<f32>, ${BR * HD4}>;
var<workgroup> KVs: array<vec4<f32>, ${BC * HD4}>;
var<workgroup> Ps: array<f32, ${BR * BC}>;
var<workgroup> Ms: array<f32, ${BR * TPR}>;
var<workgroup> Ls: array<f32, ${BR * TPR}>;`);
  if (docs) L.push(SKIP_DECLS);
  const range = (f: (n: number) => string) => unroll(N, f);
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
${queryTileHead(BR, BC, TPR, docs)}
  for (var s = li; s < ${BR * HD4}u; s += ${THREADS}u) {
    let ii = q0 + s / ${HD4}u;
    var x = vec4<f32>(0.0);
    if (ii < u.S) { x = vec4<f32>(Q[((base + ii) * u.H + h) * ${HD4}u + s % ${HD4}u]) * u.scale; }
    Qs[s] = x;
  }
  var m = MASKED;
  var l = 0.0;
${range((n) => `  var acc${n} = vec4<f32>(0.0);`)}
  for (var k0 = k_start; k0 <= q_last; k0 += ${BC}u) {
    ${keyTileEntry(BC, TPR, docs)}
    ${loadKV("K")}
    workgroupBarrier();
    var m_own = MASKED;
    for (var c = t; c < ${BC}u; c += ${TPR}u) {
      let j = k0 + c;
      var sc = MASKED;
      if (row_ok && j < u.S && allowed(i, j)${docs ? " && DOC[base + j] == doc_i" : ""}) {
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
    let alpha = exp(m - m_new);
    l *= alpha;
    for (var x = 0u; x < ${TPR}u; x++) { l += Ls[r * ${TPR}u + x]; }
${range((n) => `    acc${n} *= alpha;`)}
    for (var c = 0u; c < ${BC}u; c++) {
      let p = Ps[r * ${BC}u + c];
${range((n) => `      acc${n} += p * KVs[c * ${HD4}u + ${n * TPR}u + t];`)}
    }
    m = m_new;
  }
  if (row_ok) {
    let o = ((base + i) * u.H + h) * ${HD4}u;
    let inv = 1.0 / l;
${range((n) => `    O[o + ${n * TPR}u + t] = vec4<${v.out}>(acc${n} * inv);`)}
    if (t == 0u) { LSE[(base + i) * u.H + h] = m + log(l); }
  }
}`);
  return L.join("\n");
}

function statsWgsl(hd: number, dout: Float, out: Float): string {
  const HD4 = hd / 4;
  const L = opening([dout, out], [
    ["DO", vec(dout), "read"],
    ["O", vec(out), "read"],
    ["LSE", "array<f32>", "read"],
    ["STATS", "array<vec2<f32>>", "read_write"],
  ]);
  L.push(`
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
  let row = (wg.y * nwg.x + wg.x) * 256u + li;
  if (row >= u.n) { return; }
  var d = 0.0;
  for (var x = 0u; x < ${HD4}u; x++) { d += dot(vec4<f32>(DO[row * ${HD4}u + x]), vec4<f32>(O[row * ${HD4}u + x])); }
  STATS[row] = vec2<f32>(LSE[row], d);
}`);
  return L.join("\n");
}

function backwardInputs(v: Variant): Binding[] {
  const list: Binding[] = [
    ["Q", vec(v.q), "read"],
    ["K", vec(v.k), "read"],
    ["V", vec(v.v), "read"],
    ["DO", vec(v.dout), "read"],
    ["STATS", "array<vec2<f32>>", "read"],
  ];
  if (v.docs) list.push(["DOC", `array<${v.docs}>`, "read"]);
  return list;
}

function dqWgsl(v: Variant): string {
  const { hd } = v;
  const { BR, BC, TPR } = v.tile;
  const HD4 = hd / 4;
  const N = HD4 / TPR;
  const THREADS = BR * TPR;
  const docs = v.docs !== null;
  const list = backwardInputs(v);
  list.push(["DQ", vec(v.grad), "read_write"]);
  const L = opening([v.q, v.k, v.v, v.dout, v.grad], list);
  L.push(`
var<workgroup> Qs: array<vec4<f32>, ${BR * HD4}>;
var<workgroup> dOs: array<vec4<f32>, ${BR * HD4}>;
var<workgroup> Ks: array<vec4<f32>, ${BC * HD4}>;
var<workgroup> Vs: array<vec4<f32>, ${BC * HD4}>;
var<workgroup> dSs: array<f32, ${BR * BC}>;`);
  if (docs) L.push(SKIP_DECLS);
  const range = (f: (n: number) => string) => unroll(N, f);
  L.push(`
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
${queryTileHead(BR, BC, TPR, docs)}
  for (var s = li; s < ${BR * HD4}u; s += ${THREADS}u) {
    let ii = q0 + s / ${HD4}u;
${loadPair("Q", "DO", "ii", "u.H", "h", HD4, " * u.scale")}
    Qs[s] = x;
    dOs[s] = y;
  }
  let st = STATS[(base + min(i, u.S - 1u)) * u.H + h];
${range((n) => `  var acc${n} = vec4<f32>(0.0);`)}
  for (var k0 = k_start; k0 <= q_last; k0 += ${BC}u) {
    ${keyTileEntry(BC, TPR, docs)}
    for (var s = li; s < ${BC * HD4}u; s += ${THREADS}u) {
      let j = k0 + s / ${HD4}u;
${loadPair("K", "V", "j", "u.Hkv", "kvh", HD4)}
      Ks[s] = x;
      Vs[s] = y;
    }
    workgroupBarrier();
    for (var c = t; c < ${BC}u; c += ${TPR}u) {
      let j = k0 + c;
      var ds = 0.0;
      if (row_ok && j < u.S && allowed(i, j)${docs ? " && DOC[base + j] == doc_i" : ""}) {
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

function dkdvWgsl(v: Variant): string {
  const { hd } = v;
  const { BR, BC, TPR } = v.tile;
  const HD4 = hd / 4;
  const N = HD4 / TPR;
  const THREADS = BC * TPR;
  const docs = v.docs !== null;
  const list = backwardInputs(v);
  list.push(["DK", vec(v.grad), "read_write"], ["DV", vec(v.grad), "read_write"]);
  const L = opening([v.q, v.k, v.v, v.dout, v.grad], list);
  L.push(`
var<workgroup> Ks: array<vec4<f32>, ${BC * HD4}>;
var<workgroup> Vs: array<vec4<f32>, ${BC * HD4}>;
var<workgroup> Qs: array<vec4<f32>, ${BR * HD4}>;
var<workgroup> dOs: array<vec4<f32>, ${BR * HD4}>;
var<workgroup> Pt: array<f32, ${BC * BR}>;
var<workgroup> dSt: array<f32, ${BC * BR}>;
var<workgroup> Ls: array<f32, ${BR}>;
var<workgroup> Ds: array<f32, ${BR}>;`);
  if (docs) L.push(SKIP_DECLS);
  const range = (f: (n: number) => string) => unroll(N, f);
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
${loadPair("K", "V", "jj", "u.Hkv", "kvh", HD4)}
    Ks[s] = x;
    Vs[s] = y;
  }
  ${docs ? "let doc_j = DOC[base + min(j, u.S - 1u)];" : ""}
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
${loadPair("Q", "DO", "ii", "u.H", "h", HD4, " * u.scale")}
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
        if (key_ok && i < u.S && allowed(i, j)${docs ? " && DOC[base + i] == doc_j" : ""}) {
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

function uniforms(S: number, H: number, Hkv: number, window: number, scale: number, n = 0): Uint32Array {
  const u = new Uint32Array(8);
  u.set([S, H, Hkv, window]);
  new Float32Array(u.buffer)[4] = scale;
  u[5] = n;
  return u;
}

interface Call {
  gpu: Gpu;
  T: number;
  S: number;
  B: number;
  H: number;
  Hkv: number;
  hd: number;
  window: number;
  scale: number;
  docs: Tensor | null;
}

function callOf(q: Tensor, k: Tensor, options: PreviousOptions): Call {
  const [T, H, hd] = q.shape;
  const S = options.S;
  const w = options.window ?? null;
  for (const t of [q, k]) {
    if (t.chunked) throw new RangeError("Cannot run the previous attention kernels on row chunks");
  }
  return {
    gpu: q.gpu,
    T,
    S,
    B: T / S,
    H,
    Hkv: k.shape[1],
    hd,
    window: w === null || w >= S ? 0 : w,
    scale: 1 / Math.sqrt(hd),
    docs: options.docs ?? null,
  };
}

function kernelOf(c: Call, name: string, v: Variant, wgsl: string, outputs: number) {
  const inputs = wgsl.match(/var<storage, read>/g)!.length;
  return getKernel(c.gpu, {
    name: `attention_previous_${name}`,
    params: {
      hd: v.hd,
      tile: `${v.tile.BR}x${v.tile.BC}/${v.tile.TPR}`,
      dtypes: `${v.q}${v.k}${v.v}${v.dout}${v.out}${v.grad}`,
      docs: v.docs ?? "none",
    },
    code: wgsl,
    bindings: [...Array(inputs).fill("read"), ...Array(outputs).fill("write")],
    uniformBytes: 32,
  });
}

function variantOf(
  c: Call,
  kind: Kind,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  dout: Float,
  out: Float,
  grad: Float,
) {
  return {
    hd: c.hd,
    tile: previousTile(c.gpu, kind, c.hd),
    q: q.dtype as Float,
    k: k.dtype as Float,
    v: v.dtype as Float,
    dout,
    out,
    grad,
    docs: (c.docs?.dtype ?? null) as "u32" | "i32" | null,
  };
}

/** The previous forward: out[T,H,hd] (q's dtype) and lse[T,H], written into `out` and `lse`. */
export function previousForward(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  options: PreviousOptions,
): void {
  const c = callOf(q, k, options);
  const variant = variantOf(c, "forward", q, k, v, out.dtype as Float, out.dtype as Float, "f32");
  const kernel = kernelOf(c, "forward", variant, forwardWgsl(variant), 2);
  const buffers = [q.buffer, k.buffer, v.buffer, ...(c.docs ? [c.docs.buffer] : []), out.buffer, lse.buffer];
  recorder(c.gpu).dispatch(kernel, buffers, uniforms(c.S, c.H, c.Hkv, c.window, c.scale), [
    Math.ceil(c.S / variant.tile.BR),
    c.H,
    c.B,
  ]);
}

/** The previous backward: stats, then dq, dk, dv (f32 or f16 as given) written `=`. */
export function previousBackward(
  dout: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  grads: { dq: Tensor; dk: Tensor; dv: Tensor },
  options: PreviousOptions,
): void {
  const c = callOf(q, k, options);
  const rec = recorder(c.gpu);
  const u = uniforms(c.S, c.H, c.Hkv, c.window, c.scale, c.T * c.H);
  const stats = Tensor.empty(c.gpu, [c.T, c.H, 2], "f32", { label: "attention_previous_stats" });
  const statsKernel = getKernel(c.gpu, {
    name: "attention_previous_stats",
    params: { hd: c.hd, dtypes: `${dout.dtype}${out.dtype}` },
    code: statsWgsl(c.hd, dout.dtype as Float, out.dtype as Float),
    bindings: ["read", "read", "read", "write"],
    uniformBytes: 32,
  });
  const groups = Math.ceil((c.T * c.H) / 256);
  const max = c.gpu.limits.maxComputeWorkgroupsPerDimension;
  const y = Math.ceil(groups / max);
  rec.dispatch(statsKernel, [dout.buffer, out.buffer, lse.buffer, stats.buffer], u, [
    Math.ceil(groups / y),
    y,
  ]);
  const grad = grads.dq.dtype as Float;
  const inputs = [
    q.buffer,
    k.buffer,
    v.buffer,
    dout.buffer,
    stats.buffer,
    ...(c.docs ? [c.docs.buffer] : []),
  ];
  const dq = variantOf(c, "dq", q, k, v, dout.dtype as Float, out.dtype as Float, grad);
  rec.dispatch(kernelOf(c, "dq", dq, dqWgsl(dq), 1), [...inputs, grads.dq.buffer], u, [
    Math.ceil(c.S / dq.tile.BR),
    c.H,
    c.B,
  ]);
  const kv = variantOf(c, "dkdv", q, k, v, dout.dtype as Float, out.dtype as Float, grad);
  rec.dispatch(kernelOf(c, "dkdv", kv, dkdvWgsl(kv), 2), [...inputs, grads.dk.buffer, grads.dv.buffer], u, [
    Math.ceil(c.S / kv.tile.BC),
    c.Hkv,
    c.B,
  ]);
  stats.destroy();
}
