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
// One invocation per output element of the dispatch: elements [k0, k0 + count) of W, written
// at out[out_off + (k − k0)] (a dispatch covers one row chunk of the output). Host sizing:
// ⌈count / 256⌉ workgroups of 256 (linear id wg.y·nwg.x + wg.x).

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

fn byte_at(i: u32) -> u32 {
  return (codes[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
}

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
  let i = (wg.y * nwg.x + wg.x) * 256u + lid;
  if (i >= p.count) {
    return;
  }
  let k = p.k0 + i;
  let byte = byte_at(k >> 1u);
  let code = select(byte & 0xfu, byte >> 4u, (k & 1u) == 0u);
  out[p.out_off + i] = W(tables[code] * block_absmax(k / p.blocksize));
}
