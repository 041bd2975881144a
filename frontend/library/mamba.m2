# The ma2mba model library: the Mamba-1 and Mamba-2 mixers and the language models built
# from them, written in the ma2mba DSL. Parameter paths are the reference implementation's
# checkpoint names. Formulas: ../shared/docs/REFERENCE.md sections 1-3.

# Mamba-1 mixer: the selective SSM block (Gu & Dao 2023).
block mamba1(d_model, n_layer = 1, d_state = 16, d_conv = 4, expand = 2,
             dt_rank = ceil(d_model / 16), dt_min = 0.001, dt_max = 0.1,
             dt_init_floor = 1e-4, dt_scale = 1.0) {
  dim B, L
  require d_model >= 1 && d_state >= 1 && d_conv >= 1 && expand >= 1 && dt_rank >= 1
    else "sizes must be at least 1"
  require dt_min > 0 && dt_min <= dt_max else "dt_min must be in (0, dt_max]"
  let E = expand * d_model

  input u: [B, L, d_model]
  state conv_state: [B, E, d_conv - 1]          # the last d_conv - 1 inputs of the conv
  state ssm_state: [B, E, d_state]

  param in_proj.weight: [2 * E, d_model] = uniform(-1 / sqrt(d_model), 1 / sqrt(d_model))
  param conv1d.weight: [E, 1, d_conv] = uniform(-1 / sqrt(d_conv), 1 / sqrt(d_conv))
  param conv1d.bias: [E] = uniform(-1 / sqrt(d_conv), 1 / sqrt(d_conv))
  param x_proj.weight: [dt_rank + 2 * d_state, E] = uniform(-1 / sqrt(E), 1 / sqrt(E))
  param dt_proj.weight: [E, dt_rank] = uniform(-dt_scale / sqrt(dt_rank), dt_scale / sqrt(dt_rank))
  param dt_proj.bias: [E] = dt_bias(dt_min, dt_max, dt_init_floor)
  param A_log: [E, d_state] = a_log_arange()
  param D: [E] = ones()
  param out_proj.weight: [d_model, E] = uniform(-1 / sqrt(E * n_layer), 1 / sqrt(E * n_layer))

  let x, z = split(linear(u, in_proj.weight), [E, E])
  let x, conv_state = causal_conv1d(x, reshape(conv1d.weight, [E, d_conv]), conv1d.bias, conv_state)
  let x = silu(x)
  let dt, Bm, Cm = split(linear(x, x_proj.weight), [dt_rank, d_state, d_state])
  let dt = softplus(linear(dt, dt_proj.weight) + dt_proj.bias)
  let y, ssm_state = selective_scan(x, dt, -exp(A_log), Bm, Cm, ssm_state)
  let y = (y + x * D) * silu(z)
  return linear(y, out_proj.weight)
}

# Mamba-2 mixer: the SSD block (Dao & Gu 2024) with grouped B/C, heads and a gated RMSNorm.
block mamba2(d_model, n_layer = 1, d_state = 128, d_conv = 4, expand = 2, headdim = 64,
             ngroups = 1, chunk_size = 256, A_init_min = 1, A_init_max = 16,
             dt_min = 0.001, dt_max = 0.1, dt_init_floor = 1e-4, eps = 1e-5) {
  dim B, L
  require d_model >= 1 && d_state >= 1 && d_conv >= 1 && expand >= 1 && headdim >= 1 && ngroups >= 1
    else "sizes must be at least 1"
  require chunk_size >= 1 else "chunk_size must be at least 1"
  let E = expand * d_model
  require E % headdim == 0 else "headdim must divide the inner width expand * d_model"
  let H = E / headdim
  require H % ngroups == 0 else "ngroups must divide the number of heads"
  require 0 < A_init_min && A_init_min <= A_init_max else "A_init_range must be positive and ordered"
  require dt_min > 0 && dt_min <= dt_max else "dt_min must be in (0, dt_max]"
  let GN = ngroups * d_state
  let conv_dim = E + 2 * GN

  input u: [B, L, d_model]
  state conv_state: [B, conv_dim, d_conv - 1]
  state ssm_state: [B, H, headdim, d_state]

  param in_proj.weight: [2 * E + 2 * GN + H, d_model] = uniform(-1 / sqrt(d_model), 1 / sqrt(d_model))
  param conv1d.weight: [conv_dim, 1, d_conv] = uniform(-1 / sqrt(d_conv), 1 / sqrt(d_conv))
  param conv1d.bias: [conv_dim] = uniform(-1 / sqrt(d_conv), 1 / sqrt(d_conv))
  param dt_bias: [H] = dt_bias(dt_min, dt_max, dt_init_floor)
  param A_log: [H] = a_log_uniform(A_init_min, A_init_max)
  param D: [H] = ones()
  param norm.weight: [E] = ones()
  param out_proj.weight: [d_model, E] = uniform(-1 / sqrt(E * n_layer), 1 / sqrt(E * n_layer))

  let z, xBC, dt = split(linear(u, in_proj.weight), [E, conv_dim, H])
  let xBC, conv_state = causal_conv1d(xBC, reshape(conv1d.weight, [conv_dim, d_conv]), conv1d.bias, conv_state)
  let x, Bm, Cm = split(silu(xBC), [E, GN, GN])
  let x = reshape(x, [B, L, H, headdim])
  let Bm = reshape(Bm, [B, L, ngroups, d_state])
  let Cm = reshape(Cm, [B, L, ngroups, d_state])
  let dt = softplus(dt + dt_bias)
  let y, ssm_state = ssd_scan(x, dt, -exp(A_log), Bm, Cm, ssm_state, chunk: chunk_size)
  let y = reshape(y + x * reshape(D, [H, 1]), [B, L, E])
  return linear(rmsnorm(y * silu(z), norm.weight, eps: eps, groups: ngroups), out_proj.weight)
}

# Mamba-1 language model: embedding, n_layer x (RMSNorm -> mixer, residual), final RMSNorm,
# tied head over the vocabulary padded to a multiple of pad_vocab_size_multiple.
model mamba_lm(d_model, n_layer, vocab_size = 50277, pad_vocab_size_multiple = 8,
               d_state = 16, d_conv = 4, expand = 2, dt_rank = ceil(d_model / 16),
               eps = 1e-5, tie_embeddings = true) {
  dim B, L
  require n_layer >= 1 && vocab_size >= 1 && pad_vocab_size_multiple >= 1 else "sizes must be at least 1"
  let V = ceil(vocab_size / pad_vocab_size_multiple) * pad_vocab_size_multiple
  input input_ids: [B, L] i32
  param backbone.embedding.weight: [V, d_model] = normal(0.02)
  let residual = embedding(backbone.embedding.weight, input_ids)
  repeat n_layer as backbone.layers {
    param norm.weight: [d_model] = ones()
    let mixer = mamba1(d_model: d_model, n_layer: n_layer, d_state: d_state, d_conv: d_conv,
                       expand: expand, dt_rank: dt_rank)
    let residual = residual + mixer(rmsnorm(residual, norm.weight, eps: eps))
  }
  param backbone.norm_f.weight: [d_model] = ones()
  let hidden = rmsnorm(residual, backbone.norm_f.weight, eps: eps)
  if tie_embeddings {
    let logits = linear(hidden, backbone.embedding.weight)
  } else {
    param lm_head.weight: [V, d_model] = normal(0.02)
    let logits = linear(hidden, lm_head.weight)
  }
  return logits
}

# Mamba-2 language model: as mamba_lm with the Mamba-2 mixer; vocab padded to 16.
model mamba2_lm(d_model, n_layer, vocab_size = 50277, pad_vocab_size_multiple = 16,
                d_state = 128, d_conv = 4, expand = 2, headdim = 64, ngroups = 1,
                chunk_size = 256, eps = 1e-5, tie_embeddings = true) {
  dim B, L
  require n_layer >= 1 && vocab_size >= 1 && pad_vocab_size_multiple >= 1 else "sizes must be at least 1"
  let V = ceil(vocab_size / pad_vocab_size_multiple) * pad_vocab_size_multiple
  input input_ids: [B, L] i32
  param backbone.embedding.weight: [V, d_model] = normal(0.02)
  let residual = embedding(backbone.embedding.weight, input_ids)
  repeat n_layer as backbone.layers {
    param norm.weight: [d_model] = ones()
    let mixer = mamba2(d_model: d_model, n_layer: n_layer, d_state: d_state, d_conv: d_conv,
                       expand: expand, headdim: headdim, ngroups: ngroups,
                       chunk_size: chunk_size, eps: eps)
    let residual = residual + mixer(rmsnorm(residual, norm.weight, eps: eps))
  }
  param backbone.norm_f.weight: [d_model] = ones()
  let hidden = rmsnorm(residual, backbone.norm_f.weight, eps: eps)
  if tie_embeddings {
    let logits = linear(hidden, backbone.embedding.weight)
  } else {
    param lm_head.weight: [V, d_model] = normal(0.02)
    let logits = linear(hidden, lm_head.weight)
  }
  return logits
}

# The published checkpoints (state-spaces/*), and tiny configs for tests.
preset "mamba-130m" = mamba_lm(d_model: 768, n_layer: 24)
preset "mamba-370m" = mamba_lm(d_model: 1024, n_layer: 48)
preset "mamba-790m" = mamba_lm(d_model: 1536, n_layer: 48)
preset "mamba-1.4b" = mamba_lm(d_model: 2048, n_layer: 48)
preset "mamba-2.8b" = mamba_lm(d_model: 2560, n_layer: 64)
preset "mamba2-130m" = mamba2_lm(d_model: 768, n_layer: 24)
preset "mamba2-370m" = mamba2_lm(d_model: 1024, n_layer: 48)
preset "mamba2-780m" = mamba2_lm(d_model: 1536, n_layer: 48)
preset "mamba2-1.3b" = mamba2_lm(d_model: 2048, n_layer: 48)
preset "mamba2-2.7b" = mamba2_lm(d_model: 2560, n_layer: 64)
preset "tiny-mamba" = mamba_lm(d_model: 16, n_layer: 2, vocab_size: 61, d_state: 4)
preset "tiny-mamba2" = mamba2_lm(d_model: 32, n_layer: 2, vocab_size: 61, d_state: 8,
                                 headdim: 16, chunk_size: 8)
