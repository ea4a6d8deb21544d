// Dequantization of a bitsandbytes 4-bit weight (NF4 or FP4, with or without double
// quantization) into a float matrix, as bitsandbytes' `dequantize_4bit` computes it.
//
// n = out·in elements of W[out,in], flattened row-major; B = blocksize; nb = ⌈n/B⌉ blocks;
// NB = nested blocksize (256); nn = ⌈nb/NB⌉ nested blocks.
//
//   codes: ⌈n/2⌉ bytes packed little-endian into u32 words; element 2j is the high nibble of byte j
//   absmax: per block b, with double quantization the u8 code c_b (bytes packed in u32 words),
//           else the f32 bits of absmax_b
//   tables: quant_map[16] ‖ nested_map[256] ‖ nested_absmax[nn]  (f32)
//
//   absmax_b = nested_map[c_b] · nested_absmax[b / NB] + offset    (double quantization)
//   W[k] = quant_map[code_k] · absmax_{k / B}                       (f32, then stored as W)
//
// Blocks run across row ends (the flattening is of the whole matrix), so element k's block is
// k / B whatever the row. The products are f32 as in bitsandbytes' kernels, each rounded on its
// own (the offset is added after the product is rounded, as torch's separate `+=` does); an
// f16 output is rounded once, when it is stored.
//
// One invocation per u32 word of codes, i.e. 8 consecutive elements 8w .. 8w + 7, which share
// one block (blocksizes are multiples of 8), so its absmax is computed once. A dispatch covers
// elements [k0, k0 + count) of W (one row chunk of the output), written at
// out[out_off + (k − k0)]; its words are ⌊k0/8⌋ .. ⌊(k0 + count − 1)/8⌋, and the elements of the
// first and last word outside the range are skipped. Host sizing: ⌈words / 256⌉ workgroups of 256
// (linear id wg.y·nwg.x + wg.x).

alias W = f32;

struct Params {
  k0: u32,
  count: u32,
  out_off: u32,
  blocksize: u32,
  nested_blocksize: u32,
  double_quant: u32,
  offset: f32,
  _pad: u32,
}

@group(0) @binding(0) var<storage, read> codes: array<u32>;
@group(0) @binding(1) var<storage, read> absmax: array<u32>;
@group(0) @binding(2) var<storage, read> tables: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<W>;
@group(0) @binding(4) var<uniform> p: Params;

const NESTED_MAP = 16u;
const NESTED_ABSMAX = 272u;

fn block_absmax(b: u32) -> f32 {
  if (p.double_quant == 0u) {
    return bitcast<f32>(absmax[b]);
  }
  let c = (absmax[b >> 2u] >> ((b & 3u) * 8u)) & 0xffu;
  // Rounded product first, then the offset: a fused multiply-add would round once.
  var scaled = tables[NESTED_MAP + c] * tables[NESTED_ABSMAX + b / p.nested_blocksize];
  scaled = bitcast<f32>(bitcast<u32>(scaled));
  return scaled + p.offset;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let first = p.k0 >> 3u;
  let w = first + (wg.y * nwg.x + wg.x) * 256u + lid;
  let end = p.k0 + p.count;
  if (w * 8u >= end) {
    return;
  }
  let word = codes[w];
  let a = block_absmax((w * 8u) / p.blocksize);
  for (var e = 0u; e < 8u; e++) {
    let k = w * 8u + e;
    if (k < p.k0 || k >= end) {
      continue;
    }
    // Byte j of the word holds elements 2j (high nibble) and 2j + 1 (low nibble).
    let byte = (word >> ((e >> 1u) * 8u)) & 0xffu;
    let code = select(byte & 0xfu, byte >> 4u, (e & 1u) == 0u);
    out[p.out_off + (k - p.k0)] = W(tables[code] * a);
  }
}
