/**
 * WGSL template of the elementwise kernels: out[i] = f(x0[i], x1[i], s0, s1) computed in f32.
 *
 * One invocation handles the pair of elements 2p, 2p+1 so that f16 tensors are read and
 * written as whole u32 words (unpack2x16float / pack2x16float): f16 tensors work on every
 * adapter, with or without `shader-f16`, and no two invocations write the same word. For an
 * odd element count the last word's upper half is the buffer's padding.
 *
 * Host sizing: 256 invocations per workgroup; p = (wg.y·nwg.x + wg.x)·256 + lid.x over
 * ceil(n/2) pairs, the workgroups spread over x and y when they exceed the per-dimension
 * limit. `out` is written `=`; when `out` is one of the inputs (`alias`), that input is read
 * from `out` itself (one read_write binding), which makes in-place updates such as
 * y += a·x possible.
 * @module
 */

/** dtypes the elementwise template handles. */
export type ElementDType = "f32" | "f16";

/** One compiled variant. */
export interface ElementwiseVariant {
  /** f32 expression over vec2<f32> inputs `x0`, `x1` and f32 scalars `u.s0`, `u.s1`. */
  expr: string;
  inputs: readonly ElementDType[];
  out: ElementDType;
  /** Per input: whether it is `out` itself (read through the output binding). */
  aliased: readonly boolean[];
}

/** Invocations per workgroup. */
export const ELEMENTWISE_WORKGROUP = 256;

/** Bytes of the uniform block: n, s0, s1, bits. */
export const ELEMENTWISE_UNIFORM_BYTES = 16;

/** Generates the WGSL of one variant. */
export function elementwiseWgsl(v: ElementwiseVariant): string {
  const L: string[] = [];
  L.push("struct Params { n: u32, s0: f32, s1: f32, bits: u32 }");
  let binding = 0;
  const names: string[] = [];
  v.inputs.forEach((t, i) => {
    if (v.aliased[i]) {
      names.push("O");
      return;
    }
    names.push(`X${i}`);
    L.push(
      `@group(0) @binding(${binding++}) var<storage, read> X${i}: array<${t === "f16" ? "u32" : "f32"}>;`,
    );
  });
  L.push(
    `@group(0) @binding(${binding++}) var<storage, read_write> O: array<${v.out === "f16" ? "u32" : "f32"}>;`,
  );
  L.push(`@group(0) @binding(${binding++}) var<uniform> u: Params;`);
  const body: string[] = [];
  body.push(`  let p = (wg.y * nwg.x + wg.x) * ${ELEMENTWISE_WORKGROUP}u + lid.x;`);
  body.push(`  let i = 2u * p;`);
  body.push(`  if (i >= u.n) { return; }`);
  body.push(`  let hi = i + 1u < u.n;`);
  v.inputs.forEach((t, k) => {
    const name = names[k];
    if (t === "f16") body.push(`  let x${k} = unpack2x16float(${name}[p]);`);
    else body.push(`  let x${k} = vec2<f32>(${name}[i], select(0.0, ${name}[i + 1u], hi));`);
  });
  body.push(`  let r: vec2<f32> = ${v.expr};`);
  if (v.out === "f16") body.push(`  O[p] = pack2x16float(r);`);
  else body.push(`  O[i] = r.x;\n  if (hi) { O[i + 1u] = r.y; }`);
  L.push(`@compute @workgroup_size(${ELEMENTWISE_WORKGROUP})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
${body.join("\n")}
}`);
  return L.join("\n");
}

/** WGSL of `fill_words`: O[i] = u.bits for i < n, one 32-bit word per invocation (u32, i32). */
export function fillWordsWgsl(): string {
  return `struct Params { n: u32, s0: f32, s1: f32, bits: u32 }
@group(0) @binding(0) var<storage, read_write> O: array<u32>;
@group(0) @binding(1) var<uniform> u: Params;
@compute @workgroup_size(${ELEMENTWISE_WORKGROUP})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = (wg.y * nwg.x + wg.x) * ${ELEMENTWISE_WORKGROUP}u + lid.x;
  if (i < u.n) { O[i] = u.bits; }
}`;
}
