"""Default configuration: the DDPM CIFAR-10 recipe (Ho et al. 2020).

Every other config imports this one and overrides a few fields, so every key
below exists in every config. Override any of them from the command line:
``--config.training.batch_size=256``.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global, over all devices of all hosts
  training.num_train_steps = 800_000
  training.log_every_steps = 100
  training.checkpoint_every_steps = 10_000
  training.sample_every_steps = 50_000
  training.num_sample_images = 64  # images in the periodic sample grid
  training.max_to_keep = 3  # checkpoints kept on disk
  training.steps_per_call = 1  # train steps fused into one jitted call (lax.scan)
  training.label_dropout = 0.0  # classifier-free guidance: p(label -> "no class")
  training.shard_params = False  # FSDP-style sharding of params/opt state
  training.seed = 0

  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 2e-4
  optim.warmup_steps = 5000
  optim.grad_clip = 1.0
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.ema_decay = 0.9999
  # EMA decay warm-up: decay_k = min(ema_decay, (1 + k) / (10 + k)) when True,
  # so samples from early checkpoints are not noise.
  optim.ema_warmup = False

  config.data = data = ml_collections.ConfigDict()
  # 'digits' (built in), a tfds name such as 'cifar10', or 'folder:/path'.
  data.dataset = "cifar10"
  data.image_size = 32
  data.channels = 3
  data.random_flip = True
  data.num_classes = 10  # labels the data carries (0: none)
  data.data_dir = ""  # tfds data directory ("": TFDS_DATA_DIR or tfds' default)
  # grain decoding processes (0: in this process); 2 or more batch otherwise.
  data.worker_count = 0

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = "linear"
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.model_mean_type = "eps"  # eps | x0 | v
  diffusion.model_var_type = "fixedlarge"  # fixedlarge | fixedsmall | learned | learned_range
  diffusion.loss_type = "mse"  # mse | kl | hybrid

  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"  # unet | classifier (noise-aware, for classifier guidance)
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  # Class conditioning: 0 = unconditional; N > 0 adds an embedding of N + 1
  # ids, the last one meaning "no class" (classifier-free guidance).
  model.num_classes = 0
  # Cascaded super-resolution (Ho et al. 2021): low_res_size > 0 makes the
  # U-Net take a low_res_size x low_res_size image (nearest-upsampled and
  # concatenated to its input). noise_aug_max: the largest noise-conditioning
  # augmentation level, as a fraction of T (levels s ~ U{0..noise_aug_max*T},
  # 0 = clean), applied to the low-resolution input during training.
  model.low_res_size = 0
  model.noise_aug_max = 0.0
  model.dtype = "float32"  # compute dtype; parameters stay float32
  model.remat = False  # rematerialise ResNet blocks to save memory
  # 3x3 convolutions: 'auto' = Winograd F(4x4, 3x3) / F(2x2, 3x3) on a CPU
  # for layers with >= 128 channels and large enough maps (fewer
  # multiplications; faster there; see models.layers.winograd_tile), XLA's own
  # convolutions elsewhere and on GPU/TPU. 'direct' or 'winograd' force one;
  # parameters are the same either way.
  model.conv_algorithm = "auto"
  # Attention: 'einsum' (any backend) or 'cudnn' (cuDNN's fused flash
  # attention: an NVIDIA GPU and bfloat16/float16 compute; the attention
  # weights never go to memory). Same parameters and function.
  model.attention_algorithm = "einsum"
  # Improved DDPM's architecture (Nichol & Dhariwal 2021); off: DDPM's.
  model.num_heads = 1  # attention heads
  model.scale_shift_norm = False  # t scales/shifts each block's 2nd GroupNorm
  model.rescale_timesteps = False  # the network embeds t * 1000 / T

  return config
