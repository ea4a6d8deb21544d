/**
 * WGSL template of the tiled matmul: C[M,N] = alpha·op(A)·op(B) (+ bias[N]) (+ C).
 *
 * One workgroup computes a BM×BN tile of C for one batch entry (workgroup_id.z). It walks K
 * in steps of BK: the threads copy the BM×BK slice of A and the BK×BN slice of B into
 * workgroup memory, both stored k-major as vec4 rows (As[k][m/4], Bs[k][n/4]), then each
 * thread accumulates its TM×TN register block from them. Thread (tx, ty) of the TX×TY grid
 * (TX = BN/TN, TY = BM/TM) owns rows (i·TY + ty)·4 + ii and columns (j·TX + tx)·4 + jj, so
 * neighbouring threads read neighbouring vec4s of workgroup memory and write neighbouring
 * vec4s of C. Accumulation is f32 for every input dtype; with `f16Tiles`, an f16 operand's tile
 * stays f16 in workgroup memory (half the bytes and the traffic) and is widened to f32 when
 * read, so the products and sums are the f32 ones either way.
 *
 * Every tile accumulates each element of C in one f32 register, over k = 0, 1, …, K−1 in
 * order, one `fma` per k, from 0: the tile sizes change which invocation computes an element
 * and when, never the sequence of operations that produces it, so every tile gives the same
 * bits. A K that is not a multiple of BK ends with a shorter step (`kTail`) rather than
 * multiply-adds of zero padding, which could turn a −0 sum into +0.
 *
 * Host sizing: workgroups = (ceil(N/BN), ceil(M/BM), batch). C is written `=`, or `+=` with
 * `accumulate`. Layouts (row-major; ld = leading dimension in elements):
 *   NN: A[M,K] (lda ≥ K), B[K,N] (ldb ≥ N)   — x·W for W stored [in,out]; dX = dY·W
 *   NT: A[M,K], B[N,K] (ldb ≥ K)             — y = x·Wᵀ, the linear layer
 *   TN: A[K,M] (lda ≥ M), B[K,N]             — dW = dYᵀ·X
 * Offsets (a_off, b_off, c_off, bias_off) and batch strides are in elements, so one binding
 * can serve a sub-matrix (row chunks of a weight, a slice of a batch).
 *
 * With a low-rank term (`lowRank`, NN and NT, unbatched), the accumulator of each element goes on
 * after k = K−1 over a second, short segment q = 0, 1, …, r−1 of another operand pair, both f32:
 *   NT: acc += Σ_q (s·A2[m,q])·B2[n,q]     A2[M,r], B2[N,r]   — y = x·Wᵀ + s·xa·Bᵀ (LoRA forward)
 *   NN: acc += Σ_q (s·A2[m,q])·B2[q,n]     A2[M,r], B2[r,N]   — dx = dy·W + dxa·A (LoRA backward)
 * with s = `lr_scale` (the host passes scale/alpha, so C = alpha·op(A)·op(B) + scale·A2·op(B2)),
 * one `fma` per q in order, after the products of op(A)·op(B): the epilogue then applies alpha, bias and C
 * as without it. Each invocation reads the r values of its rows of A2 and columns of B2 straight
 * from storage (no workgroup memory: r is small, and the reads hit the cache), 4 values of q per
 * step when r is a multiple of 4, else one; either way one `fma` per q, so the tile does not
 * change the bits here either. The term adds A2 and B2 to the bindings (5 storage buffers at most).
 *
 * A second family, `matmulDirectWgsl`, uses no workgroup memory: it is the fast form on CPU
 * adapters (lavapipe/llvmpipe), where each invocation is one SIMD lane, every storage or
 * workgroup load costs a scalar access per lane, barriers switch coroutines, and caches
 * already give the reuse that workgroup memory gives a GPU. There the cost is the number of
 * loads per multiply-add, so each invocation holds a large TM×TN register block. It too sums
 * each element over k in order, one `fma` per k, and pads K to a multiple of 4 for every block
 * alike, so its blocks give the same bits as each other (the two families may differ in the
 * sign of a zero sum, so a device uses one family: tiled on GPUs, direct on CPU adapters).
 * @module
 */

/** Matmul operand layouts: N = as stored, T = transposed. */
export type MatmulLayout = "NN" | "NT" | "TN";

/** Float dtypes a matmul operand can have. */
export type FloatDType = "f32" | "f16";

/** Tile sizes of the tiled kernel. */
export interface MatmulTile {
  /** Rows of C per workgroup. */
  BM: number;
  /** Columns of C per workgroup. */
  BN: number;
  /** K step held in workgroup memory. */
  BK: number;
  /** Rows per thread (multiple of 4). */
  TM: number;
  /** Columns per thread (multiple of 4). */
  TN: number;
  /** Keep the workgroup tiles of f16 operands in f16 (widened to f32 when read); default false. */
  f16Tiles?: boolean;
}

/** Everything that selects one compiled variant of the tiled matmul. */
export interface MatmulVariant {
  layout: MatmulLayout;
  a: FloatDType;
  b: FloatDType;
  c: FloatDType;
  bias: FloatDType | "none";
  accumulate: boolean;
  /** A's contiguous dimension, lda, a_off and stride_a are multiples of 4: vec4 loads. */
  vecA: boolean;
  /** Same for B. */
  vecB: boolean;
  /** N, ldc, c_off and stride_c (and bias_off) are multiples of 4: vec4 stores. */
  vecC: boolean;
  /** M, N, K are multiples of BM, BN, BK: no bounds checks. */
  exact: boolean;
  /** K is not a multiple of BK: the last K step is shorter (never set with `exact`). */
  kTail: boolean;
  tile: MatmulTile;
  /** A low-rank term continues the accumulators (NN and NT only); absent: none. */
  lowRank?: LowRankVariant;
}

/** How a fused low-rank term's operands A2[M,r] and B2 (NT: [N,r], NN: [r,N]) are read. */
export interface LowRankVariant {
  /** r is a multiple of 4: A2, and NT's B2, read as vec4 along r, four values of q per step. */
  vecR: boolean;
  /** NN: N, ldb2 and b2_off are multiples of 4: B2[r,N] read as vec4 along N. */
  vecN: boolean;
}

/** Register block of the direct (no workgroup memory) kernel. */
export interface MatmulDirectTile {
  /** Rows of C per invocation (and per workgroup). */
  TM: number;
  /** Columns of C per invocation. */
  TN: number;
  /** Invocations per workgroup, along N: a workgroup covers TM × WG·TN. */
  WG: number;
}

/** Bytes of the uniform block (see `Params` below). */
export const MATMUL_UNIFORM_BYTES = 64;

/** Bytes of the uniform block with a low-rank term ({@link MatmulLowRankParams} added). */
export const MATMUL_LOWRANK_UNIFORM_BYTES = 80;

/**
 * Which kernel runs a product: `tiled` (workgroup-memory tiles; GPUs) or `direct`
 * (per-invocation register blocks, no workgroup memory; CPU adapters).
 */
export type MatmulConfig = { kind: "tiled"; tile: MatmulTile } | { kind: "direct"; tile: MatmulDirectTile };

/** Operand dtypes of a product, as far as the choice of kernel is concerned. */
export interface MatmulOperands {
  a: FloatDType;
  b: FloatDType;
}

/** A product as the choice of kernel sees it. */
export interface MatmulShape extends MatmulOperands {
  layout: MatmulLayout;
  M: number;
  N: number;
  K: number;
}

/** The uniform block: dims, leading dims, offsets, batch strides (elements), alpha. */
export interface MatmulUniformParams {
  M: number;
  N: number;
  K: number;
  lda: number;
  ldb: number;
  ldc: number;
  aOff: number;
  bOff: number;
  cOff: number;
  biasOff: number;
  strideA: number;
  strideB: number;
  strideC: number;
  alpha: number;
  /** The low-rank term's fields, for a variant with `lowRank`. */
  lowRank?: MatmulLowRankParams;
}

/** Uniform fields of a low-rank term: its rank, scale, element offsets and B2's leading dimension. */
export interface MatmulLowRankParams {
  r: number;
  /** Multiplies A2: scale/alpha for C = alpha·op(A)·op(B) + scale·A2·op(B2). */
  scale: number;
  a2Off: number;
  b2Off: number;
  /** Row length of B2 in elements: r for NT's B2[N,r], N for NN's B2[r,N]. */
  ldb2: number;
}

/** Packs the uniform block of {@link MatmulUniformParams}. */
export function matmulUniforms(p: MatmulUniformParams): Uint32Array {
  const u = new Uint32Array(p.lowRank ? MATMUL_LOWRANK_UNIFORM_BYTES / 4 : MATMUL_UNIFORM_BYTES / 4);
  u.set([
    p.M,
    p.N,
    p.K,
    p.lda,
    p.ldb,
    p.ldc,
    p.aOff,
    p.bOff,
    p.cOff,
    p.biasOff,
    p.strideA,
    p.strideB,
    p.strideC,
  ]);
  const f = new Float32Array(u.buffer);
  f[13] = p.alpha;
  if (p.lowRank) {
    const lr = p.lowRank;
    u[14] = lr.r;
    f[15] = lr.scale;
    u.set([lr.a2Off, lr.b2Off, lr.ldb2], 16);
  }
  return u;
}

/** The uniform block's WGSL: a low-rank term's fields take the padding and follow it. */
function paramsWgsl(lowRank: boolean): string {
  const tail = lowRank
    ? "r: u32, lr_scale: f32,\n  a2_off: u32, b2_off: u32, ldb2: u32, pad0: u32,"
    : "pad0: u32, pad1: u32,";
  return `
struct Params {
  M: u32, N: u32, K: u32, lda: u32,
  ldb: u32, ldc: u32, a_off: u32, b_off: u32,
  c_off: u32, bias_off: u32, stride_a: u32, stride_b: u32,
  stride_c: u32, alpha: f32, ${tail}
}`;
}

/** Checks that a tile fits the template's rules and returns the thread grid. */
export function tileThreads(t: MatmulTile): { TX: number; TY: number } {
  const ok = t.TM % 4 === 0 && t.TN % 4 === 0 && t.BM % t.TM === 0 && t.BN % t.TN === 0 && t.BK % 4 === 0;
  if (!ok) {
    throw new RangeError(`Cannot build matmul tile ${JSON.stringify(t)}: TM, TN, BK must be multiples of 4`);
  }
  return { TX: t.BN / t.TN, TY: t.BM / t.TM };
}

/**
 * Bytes of workgroup memory a tile needs: BM·BK elements of A and BN·BK of B, 4 bytes each,
 * or 2 for an f16 operand with `f16Tiles`.
 */
export function tileStorageBytes(t: MatmulTile, a: FloatDType, b: FloatDType): number {
  const bytes = (dtype: FloatDType) => (t.f16Tiles && dtype === "f16" ? 2 : 4);
  return t.BK * (t.BM * bytes(a) + t.BN * bytes(b));
}

/** Generates the WGSL of one variant (see the module documentation). */
export function matmulWgsl(v: MatmulVariant): string {
  const { BM, BN, BK, TM, TN } = v.tile;
  const { TX, TY } = tileThreads(v.tile);
  if (v.exact && v.kTail) throw new RangeError("Cannot build matmul: an exact variant has no K tail");
  const threads = TX * TY;
  // Workgroup storage type of each operand's tile.
  const sa: FloatDType = v.tile.f16Tiles && v.a === "f16" ? "f16" : "f32";
  const sb: FloatDType = v.tile.f16Tiles && v.b === "f16" ? "f16" : "f32";
  const usesF16 = [v.a, v.b, v.c, v.bias].includes("f16");
  const edge = !v.exact;
  const L: string[] = [];
  if (usesF16) L.push("enable f16;");
  L.push(paramsWgsl(v.lowRank !== undefined));
  L.push(bindingsWgsl(v));
  L.push(`
var<workgroup> As: array<vec4<${sa}>, ${(BK * BM) / 4}>; // As[k·BM/4 + m/4] = A(m0 + m .. +3, k0 + k)
var<workgroup> Bs: array<vec4<${sb}>, ${(BK * BN) / 4}>; // Bs[k·BN/4 + n/4] = B(k0 + k, n0 + n .. +3)
`);

  // Loads one vec4 of an operand along its contiguous dimension at element index `idx` as the
  // tile's storage type `st`, masked by `ok` (row in range) and, for scalar loads, per element
  // by `lim` (elements left).
  const load4 = (name: string, vec: boolean, st: FloatDType, idx: string, ok: string, lim: string) => {
    if (vec) {
      const value = `vec4<${st}>(${name}[(${idx}) / 4u])`;
      return edge ? `select(vec4<${st}>(0.0), ${value}, ${ok})` : value;
    }
    const parts = [0, 1, 2, 3].map((i) => {
      const value = `${st}(${name}[${idx} + ${i}u])`;
      return edge ? `select(${st}(0.0), ${value}, ${ok} && ${i}u < ${lim})` : value;
    });
    return `vec4<${st}>(${parts.join(", ")})`;
  };

  // Each thread moves `per` vec4 slots of each operand tile per K step: it fetches them from
  // global memory into registers (p<name><l>) one step ahead, and stores them to workgroup
  // memory after the barrier, so global latency overlaps the multiply-adds of the current step.
  interface Operand {
    name: "A" | "B";
    vec: boolean;
    st: FloatDType; // workgroup storage type
    alongK: boolean; // stored [rows, K] (contiguous along k) rather than [K, rows]
    rows: number; // BM or BN
    shared: string;
    base: string;
    ld: string;
    outer: string; // m0 or n0
    limit: string; // u.M or u.N
  }
  const operands: Operand[] = [
    {
      name: "A",
      vec: v.vecA,
      st: sa,
      alongK: v.layout !== "TN",
      rows: BM,
      shared: "As",
      base: "a_base",
      ld: "u.lda",
      outer: "m0",
      limit: "u.M",
    },
    {
      name: "B",
      vec: v.vecB,
      st: sb,
      alongK: v.layout === "NT",
      rows: BN,
      shared: "Bs",
      base: "b_base",
      ld: "u.ldb",
      outer: "n0",
      limit: "u.N",
    },
  ];
  const setup: string[] = [];
  const fetch: string[] = [];
  const store: string[] = [];
  for (const o of operands) {
    const slots = (o.rows * BK) / 4;
    const per = Math.ceil(slots / threads);
    for (let l = 0; l < per; l++) {
      const id = `${o.name.toLowerCase()}${l}`;
      const guard = (l + 1) * threads > slots ? `s_${id} < ${slots}u` : "";
      setup.push(`  let s_${id} = li + ${l * threads}u;`);
      setup.push(`  var p_${id} = vec4<${o.st}>(0.0);`);
      if (o.alongK) {
        // [rows, K]: the slot is 4 consecutive k of one row; stored scattered k-major.
        setup.push(`  let r_${id} = s_${id} / ${BK / 4}u;`);
        setup.push(`  let k_${id} = (s_${id} % ${BK / 4}u) * 4u;`);
        const gr = `${o.outer} + r_${id}`;
        const gk = `k0 + k_${id}`;
        const value = load4(
          o.name,
          o.vec,
          o.st,
          `${o.base} + (${gr}) * ${o.ld} + ${gk}`,
          `${gr} < ${o.limit} && ${gk} < u.K`,
          `u.K - (${gk})`,
        );
        fetch.push(guard ? `    if (${guard}) { p_${id} = ${value}; }` : `    p_${id} = ${value};`);
        const scatter = [0, 1, 2, 3].map((i) =>
          `${o.shared}[(k_${id} + ${i}u) * ${o.rows / 4}u + r_${id} / 4u][r_${id} % 4u] = p_${id}[${i}];`
        ).join(" ");
        store.push(guard ? `    if (${guard}) { ${scatter} }` : `    ${scatter}`);
      } else {
        // [K, rows]: the slot is 4 consecutive rows at one k; stored as is.
        setup.push(`  let k_${id} = s_${id} / ${o.rows / 4}u;`);
        setup.push(`  let r_${id} = (s_${id} % ${o.rows / 4}u) * 4u;`);
        const gk = `k0 + k_${id}`;
        const gr = `${o.outer} + r_${id}`;
        const value = load4(
          o.name,
          o.vec,
          o.st,
          `${o.base} + (${gk}) * ${o.ld} + ${gr}`,
          `${gk} < u.K && ${gr} < ${o.limit}`,
          `${o.limit} - (${gr})`,
        );
        fetch.push(guard ? `    if (${guard}) { p_${id} = ${value}; }` : `    p_${id} = ${value};`);
        const put = `${o.shared}[s_${id}] = p_${id};`;
        store.push(guard ? `    if (${guard}) { ${put} }` : `    ${put}`);
      }
    }
  }

  // The multiply-adds of one K step over k < `bound`: acc(m, n) = fma(A(m, k), B(k, n), acc).
  const widen = (st: FloatDType, value: string) => st === "f16" ? `vec4<f32>(${value})` : value;
  const acc = (i: number, j: number) => `acc_${i}_${j}`; // row i of TM, column group j of TN/4
  const step = (bound: string, indent: string): string[] => {
    const S: string[] = [];
    S.push(`${indent}for (var k = 0u; k < ${bound}; k++) {`);
    for (let i = 0; i < TM / 4; i++) {
      S.push(`${indent}  let a${i} = ${widen(sa, `As[k * ${BM / 4}u + ${i * TY}u + ty]`)};`);
    }
    for (let j = 0; j < TN / 4; j++) {
      S.push(`${indent}  let b${j} = ${widen(sb, `Bs[k * ${BN / 4}u + ${j * TX}u + tx]`)};`);
    }
    for (let i = 0; i < TM / 4; i++) {
      for (let ii = 0; ii < 4; ii++) {
        for (let j = 0; j < TN / 4; j++) {
          const c = acc(i * 4 + ii, j);
          S.push(`${indent}  ${c} = fma(vec4<f32>(a${i}[${ii}]), b${j}, ${c});`);
        }
      }
    }
    S.push(`${indent}}`);
    return S;
  };

  const body: string[] = [];
  body.push(`  let batch = wg.z;`);
  body.push(`  let a_base = u.a_off + batch * u.stride_a;`);
  body.push(`  let b_base = u.b_off + batch * u.stride_b;`);
  body.push(`  let c_base = u.c_off + batch * u.stride_c;`);
  body.push(`  let m0 = wg.y * ${BM}u;`);
  body.push(`  let n0 = wg.x * ${BN}u;`);
  body.push(`  let tx = lid.x;`);
  body.push(`  let ty = lid.y;`);
  body.push(...setup);
  for (let i = 0; i < TM; i++) {
    for (let j = 0; j < TN / 4; j++) body.push(`  var ${acc(i, j)} = vec4<f32>(0.0);`);
  }
  body.push(`  var k0 = 0u;`);
  body.push(`  if (u.K > 0u) {`);
  body.push(...fetch);
  body.push(`  }`);
  body.push(`  for (; k0 < u.K; k0 += ${BK}u) {`);
  body.push(...store);
  body.push(`    workgroupBarrier();`);
  body.push(`    if (k0 + ${BK}u < u.K) {`);
  body.push(`      let k0 = k0 + ${BK}u;`);
  body.push(...fetch.map((line) => `  ${line}`));
  body.push(`    }`);
  if (v.kTail) {
    // The last step covers only the K − k0 < BK values of k that exist (a uniform branch).
    body.push(`    if (k0 + ${BK}u <= u.K) {`);
    body.push(...step(`${BK}u`, "      "));
    body.push(`    } else {`);
    body.push(...step(`u.K - k0`, "      "));
    body.push(`    }`);
  } else {
    body.push(...step(`${BK}u`, "    "));
  }
  body.push(`    workgroupBarrier();`);
  body.push(`  }`);
  if (v.lowRank !== undefined) {
    const rows: string[] = [];
    for (let i = 0; i < TM / 4; i++) {
      for (let ii = 0; ii < 4; ii++) rows.push(`m0 + ${i * TY * 4}u + ty * 4u + ${ii}u`);
    }
    const groups = Array.from({ length: TN / 4 }, (_, j) => `n0 + ${j * TX * 4}u + tx * 4u`);
    body.push(...lowRankWgsl(v.layout, v.lowRank, {
      rows,
      groups,
      clamp: edge,
      update: (i, g, x, y) => [`${acc(i, g)} = fma(vec4<f32>(${x}), ${y}, ${acc(i, g)});`],
      indent: "  ",
    }));
  }

  // Epilogue: C = alpha·acc (+ bias) (+ C).
  for (let i = 0; i < TM / 4; i++) {
    for (let ii = 0; ii < 4; ii++) {
      body.push(`  {`);
      body.push(`    let r = m0 + ${i * TY * 4}u + ty * 4u + ${ii}u;`);
      if (edge) body.push(`    if (r < u.M) {`);
      for (let j = 0; j < TN / 4; j++) {
        const c = acc(i * 4 + ii, j);
        body.push(`    {`);
        body.push(`      let c = n0 + ${j * TX * 4}u + tx * 4u;`);
        body.push(`      let ci = c_base + r * u.ldc + c;`);
        if (v.vecC) {
          if (edge) body.push(`      if (c < u.N) {`);
          let value = `${c} * u.alpha`;
          if (v.bias !== "none") {
            const o = (t: number) => `f32(BIAS[u.bias_off + c + ${t}u])`;
            value += ` + vec4<f32>(${o(0)}, ${o(1)}, ${o(2)}, ${o(3)})`;
          }
          if (v.accumulate) value += ` + vec4<f32>(C[ci / 4u])`;
          body.push(`      C[ci / 4u] = vec4<${v.c}>(${value});`);
          if (edge) body.push(`      }`);
        } else {
          for (let jj = 0; jj < 4; jj++) {
            if (edge) body.push(`      if (c + ${jj}u < u.N) {`);
            let value = `${c}[${jj}] * u.alpha`;
            if (v.bias !== "none") value += ` + f32(BIAS[u.bias_off + c + ${jj}u])`;
            if (v.accumulate) value += ` + f32(C[ci + ${jj}u])`;
            body.push(`      C[ci + ${jj}u] = ${v.c}(${value});`);
            if (edge) body.push(`      }`);
          }
        }
        body.push(`    }`);
      }
      if (edge) body.push(`    }`);
      body.push(`  }`);
    }
  }

  L.push(`@compute @workgroup_size(${TX}, ${TY})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
${body.join("\n")}
}`);
  return L.join("\n");
}

/** Where one invocation's register block lies, for {@link lowRankWgsl}. */
interface RegisterBlock {
  /** Row indices of C (in the product), one per row of the block. */
  rows: string[];
  /** First column of each group of 4 consecutive columns of the block. */
  groups: string[];
  /** Clamp rows and columns into the product before loading (false when every one is in range). */
  clamp: boolean;
  /**
   * Statements for acc(row i, columns of group g) += x·y: `x` an f32, `y` the vec4 of the group's
   * 4 values, `yAt(jj)` its element jj.
   */
  update: (i: number, g: number, x: string, y: string, yAt: (jj: number) => string) => string[];
  indent: string;
}

/**
 * The low-rank segment of a register block (see the module documentation): for q = 0 .. r−1 in
 * order, acc(m, n) = fma(A2[m,q]·lr_scale, op(B2)(q, n), acc(m, n)).
 */
function lowRankWgsl(layout: MatmulLayout, lr: LowRankVariant, block: RegisterBlock): string[] {
  if (layout === "TN") throw new RangeError("Cannot build matmul: a low-rank term needs layout NN or NT");
  const { rows, groups, clamp } = block;
  const I = block.indent;
  const S: string[] = [`${I}{`];
  if (clamp) {
    S.push(`${I}  let lr_m_last = max(u.M, 1u) - 1u;`);
    S.push(`${I}  let lr_n_last = max(u.N, 1u) - 1u;`);
  }
  const row = (e: string) => clamp ? `min(${e}, lr_m_last)` : `(${e})`;
  const col = (e: string) => clamp ? `min(${e}, lr_n_last)` : `(${e})`;
  const colGroup = (e: string) => clamp ? `min(${e}, max(u.N, 4u) - 4u)` : `(${e})`;
  const jjs = [0, 1, 2, 3];
  // Element index of A2(row, 0) and of B2 at q = 0 of each column (NN with vec4: of each group).
  rows.forEach((r, i) => S.push(`${I}  let lr_a${i} = u.a2_off + ${row(r)} * u.r;`));
  const vecGroups = layout === "NN" && lr.vecN;
  groups.forEach((c, g) => {
    if (vecGroups) S.push(`${I}  let lr_b${g} = u.b2_off + ${colGroup(c)};`);
    else {
      for (const jj of jjs) {
        const index = col(`${c} + ${jj}u`);
        S.push(`${I}  let lr_b${g}_${jj} = u.b2_off + ${layout === "NT" ? `${index} * u.r` : index};`);
      }
    }
  });
  const update = (i: number, g: number, x: string, y: string, yAt: (jj: number) => string) =>
    block.update(i, g, x, y, yAt).map((line) => `${I}    ${line}`);
  if (lr.vecR) {
    // Four values of q per step: vec4 loads along r (A2, and NT's B2).
    S.push(`${I}  for (var q = 0u; q < u.r; q += 4u) {`);
    rows.forEach((_, i) => S.push(`${I}    let x${i} = A2[(lr_a${i} + q) / 4u] * u.lr_scale;`));
    groups.forEach((_, g) => {
      if (layout === "NT") {
        for (const jj of jjs) S.push(`${I}    let y${g}_${jj} = B2[(lr_b${g}_${jj} + q) / 4u];`);
      } else {
        for (let t = 0; t < 4; t++) {
          const value = vecGroups
            ? `B2[(lr_b${g} + (q + ${t}u) * u.ldb2) / 4u]`
            : `vec4<f32>(${jjs.map((jj) => `B2[lr_b${g}_${jj} + (q + ${t}u) * u.ldb2]`).join(", ")})`;
          S.push(`${I}    let y${t}_${g} = ${value};`);
        }
      }
    });
    for (let t = 0; t < 4; t++) {
      rows.forEach((_, i) =>
        groups.forEach((_, g) => {
          if (layout === "NT") {
            const at = (jj: number) => `y${g}_${jj}[${t}]`;
            S.push(...update(i, g, `x${i}[${t}]`, `vec4<f32>(${jjs.map(at).join(", ")})`, at));
          } else {
            S.push(...update(i, g, `x${i}[${t}]`, `y${t}_${g}`, (jj) => `y${t}_${g}[${jj}]`));
          }
        })
      );
    }
  } else {
    S.push(`${I}  for (var q = 0u; q < u.r; q++) {`);
    rows.forEach((_, i) => S.push(`${I}    let x${i} = A2[lr_a${i} + q] * u.lr_scale;`));
    groups.forEach((_, g) => {
      let value: string;
      if (layout === "NT") value = `vec4<f32>(${jjs.map((jj) => `B2[lr_b${g}_${jj} + q]`).join(", ")})`;
      else if (vecGroups) value = `B2[(lr_b${g} + q * u.ldb2) / 4u]`;
      else value = `vec4<f32>(${jjs.map((jj) => `B2[lr_b${g}_${jj} + q * u.ldb2]`).join(", ")})`;
      S.push(`${I}    let y${g} = ${value};`);
    });
    rows.forEach((_, i) =>
      groups.forEach((_, g) => S.push(...update(i, g, `x${i}`, `y${g}`, (jj) => `y${g}[${jj}]`)))
    );
  }
  S.push(`${I}  }`);
  S.push(`${I}}`);
  return S;
}

type BufferVariant = Pick<
  MatmulVariant,
  "layout" | "a" | "b" | "c" | "bias" | "vecA" | "vecB" | "vecC" | "lowRank"
>;

/** Declarations of A, B, BIAS, A2 and B2 (when present), C and the uniform block, in binding order. */
function bindingsWgsl(v: BufferVariant): string {
  const arr = (t: FloatDType, vec: boolean) => vec ? `array<vec4<${t}>>` : `array<${t}>`;
  const L: string[] = [];
  let binding = 0;
  L.push(`@group(0) @binding(${binding++}) var<storage, read> A: ${arr(v.a, v.vecA)};`);
  L.push(`@group(0) @binding(${binding++}) var<storage, read> B: ${arr(v.b, v.vecB)};`);
  if (v.bias !== "none") {
    L.push(`@group(0) @binding(${binding++}) var<storage, read> BIAS: array<${v.bias}>;`);
  }
  if (v.lowRank !== undefined) {
    const vecB2 = v.layout === "NT" ? v.lowRank.vecR : v.lowRank.vecN;
    L.push(`@group(0) @binding(${binding++}) var<storage, read> A2: ${arr("f32", v.lowRank.vecR)};`);
    L.push(`@group(0) @binding(${binding++}) var<storage, read> B2: ${arr("f32", vecB2)};`);
  }
  L.push(`@group(0) @binding(${binding++}) var<storage, read_write> C: ${arr(v.c, v.vecC)};`);
  L.push(`@group(0) @binding(${binding++}) var<uniform> u: Params;`);
  return L.join("\n");
}

/** One compiled variant of the direct kernel. */
export interface MatmulDirectVariant extends Omit<MatmulVariant, "exact" | "kTail" | "tile"> {
  /** K is a multiple of 4: no masking of the last K step. */
  kExact: boolean;
  tile: MatmulDirectTile;
}

/**
 * Generates the direct kernel. Invocation (wg, lid) computes rows m0 + i (i < TM,
 * m0 = wg.y·TM, the same rows for the whole workgroup) and columns
 * n0 + ((j >> 2)·WG + lid.x)·4 + (j & 3) (j < TN, n0 = wg.x·WG·TN) of C, with no workgroup
 * memory. K advances 4 at a time; each operand is loaded as vec4s along its contiguous
 * dimension (k for A[M,K] and B[N,K]; m for A[K,M]; n for B[K,N]), i.e. TM + TN vec4 loads
 * per 4·TM·TN multiply-adds; the last step masks k ≥ K to zero. Load indices are clamped into
 * range (no branches in the loop; clamped rows and columns are never stored).
 * Host sizing: (ceil(N / (WG·TN)), ceil(M / TM), batch). TM and TN are multiples of 4.
 */
export function matmulDirectWgsl(v: MatmulDirectVariant): string {
  const { TM, TN, WG } = v.tile;
  if (TM % 4 !== 0 || TN % 4 !== 0) {
    throw new RangeError(`Cannot build direct matmul tile ${JSON.stringify(v.tile)}`);
  }
  const aAlongK = v.layout !== "TN";
  const bAlongK = v.layout === "NT";
  const usesF16 = [v.a, v.b, v.c, v.bias].includes("f16");
  const L: string[] = [];
  if (usesF16) L.push("enable f16;");
  L.push(paramsWgsl(v.lowRank !== undefined));
  L.push(bindingsWgsl(v));
  const B: string[] = [];
  const aAt = (idx: string) => v.vecA ? `f32(A[(${idx}) / 4u][(${idx}) % 4u])` : `f32(A[${idx}])`;
  const bAt = (idx: string) => v.vecB ? `f32(B[(${idx}) / 4u][(${idx}) % 4u])` : `f32(B[${idx}])`;
  // A vec4 of 4 consecutive elements starting at element index `idx` (a multiple of 4 when vec).
  const aVec = (idx: string) =>
    v.vecA
      ? `vec4<f32>(A[(${idx}) / 4u])`
      : `vec4<f32>(${[0, 1, 2, 3].map((t) => aAt(`${idx} + ${t}u`)).join(", ")})`;
  const bVec = (idx: string) =>
    v.vecB
      ? `vec4<f32>(B[(${idx}) / 4u])`
      : `vec4<f32>(${[0, 1, 2, 3].map((t) => bAt(`${idx} + ${t}u`)).join(", ")})`;

  B.push(`  let a_base = u.a_off + wg.z * u.stride_a;`);
  B.push(`  let b_base = u.b_off + wg.z * u.stride_b;`);
  B.push(`  let c_base = u.c_off + wg.z * u.stride_c;`);
  B.push(`  let m0 = wg.y * ${TM}u;`);
  B.push(`  let n0 = wg.x * ${WG * TN}u + lid.x * 4u;`);
  B.push(`  let m_last = max(u.M, 1u) - 1u;`);
  B.push(`  let n_last = max(u.N, 1u) - 1u;`);
  // Rows (i) and columns (j) clamped for loads. Along a vec4 dimension, whole groups are
  // clamped to the last full group (the dimension is a multiple of 4 there).
  if (aAlongK) {
    for (let i = 0; i < TM; i++) B.push(`  let r${i} = min(m0 + ${i}u, m_last);`);
  } else if (v.vecA) {
    for (let g = 0; g < TM / 4; g++) B.push(`  let rg${g} = min(m0 + ${4 * g}u, max(u.M, 4u) - 4u);`);
  } else {
    for (let i = 0; i < TM; i++) B.push(`  let r${i} = min(m0 + ${i}u, m_last);`);
  }
  const col = (j: number) => `n0 + ${(j >> 2) * WG * 4 + (j & 3)}u`;
  if (bAlongK || !v.vecB) {
    for (let j = 0; j < TN; j++) B.push(`  let c${j} = min(${col(j)}, n_last);`);
  } else {
    for (let g = 0; g < TN / 4; g++) B.push(`  let cg${g} = min(${col(4 * g)}, max(u.N, 4u) - 4u);`);
  }
  for (let i = 0; i < TM; i++) for (let j = 0; j < TN; j++) B.push(`  var acc${i}_${j} = 0.0;`);

  // Loads of one K step of 4, named so that a(i, t) = op(A)(row i, k + t), b(t, j) = op(B)(k + t, col j).
  // When K is not a multiple of 4, the last step masks k + t >= K to zero (reads stay in the
  // buffer: the index is that of a neighbouring row, and robust access covers the end).
  const kMask = (t: number, value: string, zero: string) =>
    v.kExact ? value : `select(${zero}, ${value}, k + ${t}u < u.K)`;
  const loads: string[] = [];
  let a: (i: number, t: number) => string;
  let b: (t: number, j: number) => string;
  if (aAlongK) {
    for (let i = 0; i < TM; i++) {
      const base = `a_base + r${i} * u.lda + k`;
      const value = v.vecA
        ? `vec4<f32>(A[(${base}) / 4u])`
        : `vec4<f32>(${[0, 1, 2, 3].map((t) => kMask(t, aAt(`${base} + ${t}u`), "0.0")).join(", ")})`;
      loads.push(`    let a${i} = ${value};`);
    }
    a = (i, t) => `a${i}[${t}]`;
  } else if (v.vecA) {
    for (let t = 0; t < 4; t++) {
      for (let g = 0; g < TM / 4; g++) {
        const value = kMask(t, aVec(`a_base + (k + ${t}u) * u.lda + rg${g}`), "vec4<f32>(0.0)");
        loads.push(`    let a${t}_${g} = ${value};`);
      }
    }
    a = (i, t) => `a${t}_${i >> 2}[${i & 3}]`;
  } else {
    for (let t = 0; t < 4; t++) {
      for (let i = 0; i < TM; i++) {
        loads.push(`    let a${t}_${i} = ${kMask(t, aAt(`a_base + (k + ${t}u) * u.lda + r${i}`), "0.0")};`);
      }
    }
    a = (i, t) => `a${t}_${i}`;
  }
  if (bAlongK) {
    for (let j = 0; j < TN; j++) {
      const base = `b_base + c${j} * u.ldb + k`;
      const value = v.vecB
        ? `vec4<f32>(B[(${base}) / 4u])`
        : `vec4<f32>(${[0, 1, 2, 3].map((t) => kMask(t, bAt(`${base} + ${t}u`), "0.0")).join(", ")})`;
      loads.push(`    let b${j} = ${value};`);
    }
    b = (t, j) => `b${j}[${t}]`;
  } else if (v.vecB) {
    for (let t = 0; t < 4; t++) {
      for (let g = 0; g < TN / 4; g++) {
        const value = kMask(t, bVec(`b_base + (k + ${t}u) * u.ldb + cg${g}`), "vec4<f32>(0.0)");
        loads.push(`    let b${t}_${g} = ${value};`);
      }
    }
    b = (t, j) => `b${t}_${j >> 2}[${j & 3}]`;
  } else {
    for (let t = 0; t < 4; t++) {
      for (let j = 0; j < TN; j++) {
        loads.push(`    let b${t}_${j} = ${kMask(t, bAt(`b_base + (k + ${t}u) * u.ldb + c${j}`), "0.0")};`);
      }
    }
    b = (t, j) => `b${t}_${j}`;
  }
  B.push(`  for (var k = 0u; k < u.K; k += 4u) {`);
  B.push(...loads);
  for (let t = 0; t < 4; t++) {
    for (let i = 0; i < TM; i++) {
      for (let j = 0; j < TN; j++) B.push(`    acc${i}_${j} = fma(${a(i, t)}, ${b(t, j)}, acc${i}_${j});`);
    }
  }
  B.push(`  }`);
  if (v.lowRank !== undefined) {
    B.push(...lowRankWgsl(v.layout, v.lowRank, {
      rows: Array.from({ length: TM }, (_, i) => `m0 + ${i}u`),
      groups: Array.from({ length: TN / 4 }, (_, g) => col(4 * g)),
      clamp: true,
      update: (i, g, x, _y, yAt) =>
        [0, 1, 2, 3].map((jj) => `acc${i}_${4 * g + jj} = fma(${x}, ${yAt(jj)}, acc${i}_${4 * g + jj});`),
      indent: "  ",
    }));
  }

  // Epilogue: C = alpha·acc (+ bias) (+ C), a vec4 of columns at a time when aligned. The
  // bias depends on the column only: loaded once per column, not per element.
  if (v.bias !== "none") {
    for (let j = 0; j < TN; j++) B.push(`  let bias${j} = f32(BIAS[u.bias_off + min(${col(j)}, n_last)]);`);
  }
  for (let i = 0; i < TM; i++) {
    B.push(`  if (m0 + ${i}u < u.M) {`);
    B.push(`    let row = c_base + (m0 + ${i}u) * u.ldc;`);
    for (let g = 0; g < TN / 4; g++) {
      const c0 = col(4 * g);
      const term = (jj: number) => {
        let value = `acc${i}_${4 * g + jj} * u.alpha`;
        if (v.bias !== "none") value += ` + bias${4 * g + jj}`;
        if (v.accumulate) value += v.vecC ? ` + f32(old[${jj}])` : ` + f32(C[row + ${c0} + ${jj}u])`;
        return value;
      };
      if (v.vecC) {
        B.push(`    if (${c0} < u.N) {`);
        B.push(`      let ci = (row + ${c0}) / 4u;`);
        if (v.accumulate) B.push(`      let old = C[ci];`);
        B.push(`      C[ci] = vec4<${v.c}>(vec4<f32>(${[0, 1, 2, 3].map(term).join(", ")}));`);
        B.push(`    }`);
      } else {
        for (let jj = 0; jj < 4; jj++) {
          B.push(`    if (${c0} + ${jj}u < u.N) { C[row + ${c0} + ${jj}u] = ${v.c}(${term(jj)}); }`);
        }
      }
    }
    B.push(`  }`);
  }
  L.push(`@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
${B.join("\n")}
}`);
  return L.join("\n");
}

/** One compiled variant of the split-K reduction. */
export interface SplitKReduceVariant {
  c: FloatDType;
  bias: FloatDType | "none";
  accumulate: boolean;
}

/** Bytes of the split-K reduction's uniform block. */
export const SPLITK_UNIFORM_BYTES = 32;

/** Invocations per workgroup of the split-K reduction. */
export const SPLITK_WORKGROUP = 256;

/**
 * The split-K reduction: C[m,n] = alpha·Σ_s P[s,m,n] (+ bias[n]) (+ C[m,n]) over the S
 * partial products P[S,M,N] (f32) that the matmul kernel wrote, one K range each. One
 * invocation per element of C; i = (wg.y·nwg.x + wg.x)·256 + lid.x over M·N.
 */
export function splitKReduceWgsl(v: SplitKReduceVariant): string {
  const L: string[] = [];
  if (v.c === "f16" || v.bias === "f16") L.push("enable f16;");
  L.push(
    "struct Params { M: u32, N: u32, S: u32, ldc: u32, c_off: u32, bias_off: u32, alpha: f32, pad: u32 }",
  );
  let binding = 0;
  L.push(`@group(0) @binding(${binding++}) var<storage, read> P: array<f32>;`);
  if (v.bias !== "none") {
    L.push(`@group(0) @binding(${binding++}) var<storage, read> BIAS: array<${v.bias}>;`);
  }
  L.push(`@group(0) @binding(${binding++}) var<storage, read_write> C: array<${v.c}>;`);
  L.push(`@group(0) @binding(${binding++}) var<uniform> u: Params;`);
  L.push(`@compute @workgroup_size(${SPLITK_WORKGROUP})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = (wg.y * nwg.x + wg.x) * ${SPLITK_WORKGROUP}u + lid.x;
  let mn = u.M * u.N;
  if (i >= mn) { return; }
  let m = i / u.N;
  let n = i % u.N;
  var sum = 0.0;
  for (var s = 0u; s < u.S; s++) { sum += P[s * mn + i]; }
  var value = sum * u.alpha;${v.bias !== "none" ? "\n  value += f32(BIAS[u.bias_off + n]);" : ""}
  let ci = u.c_off + m * u.ldc + n;${v.accumulate ? "\n  value += f32(C[ci]);" : ""}
  C[ci] = ${v.c}(value);
}`);
  return L.join("\n");
}
