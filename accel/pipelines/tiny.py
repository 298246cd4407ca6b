"""Random-init tiny pipelines of every supported family, built fully offline.

``build(family)`` returns a real diffusers pipeline of that family (real pipeline, model, scheduler and VAE
classes; tiny configs; random weights; eval mode; CPU; float32). ``example_inputs(family)`` returns call kwargs
that run it in well under a second, so ``pipe(**example_inputs(family))`` works for every name in ``FAMILIES``.

These models prove plumbing only: random weights have none of the step-to-step or attention structure that
accelerators exploit, so no quality or speed figure may come from them (see ``accel.pipelines.reference``).
Prompt strings work for every family whose tokenizers can be built offline (see ``accel.pipelines.tokenizers``);
the Llama, Gemma, Mistral, Qwen and Qwen2-VL tokenizers (HunyuanVideo, Sana, Lumina2, Flux.2, Qwen-Image, Ovis-Image,
EasyAnimate) cannot, so those examples pass ``prompt_embeds`` (``PROMPT_EMBEDS_FAMILIES``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .adapters import ready_for_inference
from .tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer, t5_tokenizer, t5_vocab_size

_TEXT_DIM = 32  # hidden size of every tiny text encoder


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _t5_encoder(d_model: int = _TEXT_DIM):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=t5_vocab_size(), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    return T5EncoderModel(config)


def _umt5_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=t5_vocab_size(), d_model=_TEXT_DIM, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    return UMT5EncoderModel(config)


def _clip_encoder(with_projection: bool = False, hidden_size: int = _TEXT_DIM, projection_dim: int = _TEXT_DIM):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    # One block: no down-sampling, so an 8x8 image is an 8x8 latent.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), layers_per_block=1,
        norm_num_groups=8, sample_size=8, **extra,
    )


def _build_dit():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        sample_size=8, in_channels=4, out_channels=8, patch_size=2, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, num_embeds_ada_norm=1000,
    )
    return DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler())


def _pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=_TEXT_DIM, in_channels=4, out_channels=8, cross_attention_dim=16, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )


def _build_pixart(pipeline_cls_name: str):
    import diffusers
    from diffusers import DDIMScheduler

    pipeline_cls = getattr(diffusers, pipeline_cls_name)
    return pipeline_cls(
        tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(), vae=_vae(), transformer=_pixart_transformer(),
        scheduler=DDIMScheduler(),
    )


def _build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=2 * _TEXT_DIM, pooled_projection_dim=2 * _TEXT_DIM,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0),
        text_encoder=_clip_encoder(with_projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_encoder(with_projection=True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(d_model=2 * _TEXT_DIM), tokenizer_3=t5_tokenizer(),
    )


def _build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_TEXT_DIM, pooled_projection_dim=_TEXT_DIM,
        axes_dims_rope=(4, 4, 8),
    )
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0),
        text_encoder=_clip_encoder(), tokenizer=clip_tokenizer(), text_encoder_2=_t5_encoder(),
        tokenizer_2=t5_tokenizer(),
    )


def _wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def _build_wan(two_stage: bool = False):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    extra: dict[str, Any] = {}
    if two_stage:  # Wan 2.2 A14B: a high-noise and a low-noise expert, switched at `boundary_ratio`
        _seeded(1)
        extra = {"transformer_2": _wan_transformer(), "boundary_ratio": 0.5}
        _seeded(0)
    return WanPipeline(
        tokenizer=t5_tokenizer(), text_encoder=_umt5_encoder(), vae=vae, transformer=_wan_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **extra,
    )


def _build_skyreels_v2():
    from diffusers import (
        AutoencoderKLWan,
        SkyReelsV2Pipeline,
        SkyReelsV2Transformer3DModel,
        UniPCMultistepScheduler,
    )

    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    # the checkpoints' scheduler: a multistep solver sampling a flow-matching model
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return SkyReelsV2Pipeline(
        tokenizer=t5_tokenizer(), text_encoder=_umt5_encoder(), vae=vae, transformer=transformer, scheduler=scheduler,
    )


def _build_ltx_video():
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=_TEXT_DIM,
    )
    # One block each way: patch 8 and one spatio-temporal rescaling compress 16x in space and 2x in time, and the
    # decoder (configured apart from the encoder) undoes exactly that, so 5 frames of 32x32 are 3 x 2 x 2 latents.
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("conv",),
        upsample_residual=(False,), upsample_factor=(1,), down_block_types=("LTXVideoDownBlock3D",), patch_size=8,
        patch_size_t=1,
    )
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5_encoder(), tokenizer=t5_tokenizer(),
        transformer=transformer,
    )


def _build_allegro():
    from diffusers import (
        AllegroPipeline,
        AllegroTransformer3DModel,
        AutoencoderKLAllegro,
        EulerAncestralDiscreteScheduler,
    )

    transformer = AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=24, sample_height=8, sample_width=8, sample_frames=3,
        caption_channels=_TEXT_DIM,
    )
    # Two blocks: 2x in space, 2x in time (one temporal up-sampling doubles the frames), so 5 frames of 16x16 are
    # 3 x 8 x 8 latents. The Allegro VAE decodes by tiles only, of a shape its __init__ fixes (24 frames, sample_size
    # pixels, overlaps of 8 frames and 120 / 80 pixels) and one sample at a time (so slicing, for batches): a tile here
    # is one latent frame of 16x16 pixels, 8 apart.
    vae = AutoencoderKLAllegro(
        down_block_types=("AllegroDownBlock3D",) * 2, up_block_types=("AllegroUpBlock3D",) * 2,
        block_out_channels=(8, 8), temporal_downsample_blocks=(True, False), temporal_upsample_blocks=(True, False),
        latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=2, sample_size=16,
    )
    vae.enable_tiling()
    vae.enable_slicing()
    vae.kernel, vae.stride = (2, 16, 16), (2, 8, 8)
    return AllegroPipeline(
        tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(), vae=vae, transformer=transformer,
        scheduler=EulerAncestralDiscreteScheduler(),
    )


def _build_cogvideox():
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=_TEXT_DIM, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=32,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
    )
    return CogVideoXPipeline(
        tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(), vae=vae, transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


def _build_hunyuan_video():
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    # No Llama tokenizer can be built offline: the text encoders are absent and callers pass prompt_embeds.
    return HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
    )


def _build_cogview3plus():
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=_TEXT_DIM, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=8,
    )
    return CogView3PlusPipeline(
        tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(), vae=_vae(), transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


def _build_easyanimate():
    from diffusers import (
        AutoencoderKLMagvit,
        EasyAnimatePipeline,
        EasyAnimateTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    # Head dim 16: its 3D RoPE splits a head into 1/4 time, 3/8 height, 3/8 width, each even.
    # mmdit_layers = num_layers (as EasyAnimate V5.1): every block has its own text feed-forward (txt_ff); a block
    # past mmdit_layers would run its one ff twice, on the video and on the text stream.
    transformer = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=4,
        sample_height=4, num_layers=2, mmdit_layers=2, time_embed_dim=16, text_embed_dim=16,
    )
    # Three blocks: 4x spatial, 2x temporal compression, so 16x16, 5 frames is 3 latent frames of 2x2 tokens.
    vae = AutoencoderKLMagvit(
        in_channels=3, latent_channels=4, out_channels=3, block_out_channels=(8, 8, 8),
        down_block_types=("SpatialDownBlock3D", "SpatialTemporalDownBlock3D", "SpatialTemporalDownBlock3D"),
        up_block_types=("SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D"),
        layers_per_block=1, norm_num_groups=4,
    )
    # No Qwen2-VL tokenizer can be built offline: the text encoder is absent and callers pass prompt_embeds.
    return EasyAnimatePipeline(
        vae=vae, text_encoder=None, tokenizer=None, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _build_sd15():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_DIM, norm_num_groups=4, attention_head_dim=4,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=_vae(), text_encoder=_clip_encoder(), tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * _TEXT_DIM, norm_num_groups=4, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=_TEXT_DIM + 6 * 8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(), unet=unet, scheduler=EulerDiscreteScheduler(), text_encoder=_clip_encoder(),
        tokenizer=clip_tokenizer(), text_encoder_2=_clip_encoder(with_projection=True), tokenizer_2=clip_tokenizer(),
    )


def _build_sana():
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=_TEXT_DIM,
        mlp_ratio=2.0, sample_size=8, patch_size=1,
    )
    # Three stages: 4x down-sampling, so the pipeline's smallest image (32x32: it asks for multiples of 32) is an
    # 8x8 latent.
    stages = 3
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock",) * stages,
        decoder_block_types=("ResBlock",) * stages, encoder_block_out_channels=(8,) * stages,
        decoder_block_out_channels=(8,) * stages, encoder_layers_per_block=(1,) * stages,
        decoder_layers_per_block=(1,) * stages, encoder_qkv_multiscales=((),) * stages,
        decoder_qkv_multiscales=((),) * stages, downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    # No Gemma2 tokenizer can be built offline: the text encoder is absent and callers pass prompt_embeds.
    return SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)


def _build_flux2():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    # 4 latent channels, patchified 2x2 into the transformer's 16 input channels.
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_TEXT_DIM, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
    )
    # One block: no down-sampling, so an 8x8 image is an 8x8 latent (4x4 tokens after patchifying).
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=8,
    )
    # No Mistral tokenizer can be built offline: the text encoder is absent and callers pass prompt_embeds.
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=transformer)


def _build_lumina2():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, norm_eps=1e-5, axes_dim_rope=(4, 2, 2),
        axes_lens=(64, 32, 32), cap_feat_dim=_TEXT_DIM,
    )
    # The pipeline fixes vae_scale_factor at 8: four stages, so a 32x32 image is a 4x4 latent.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
        norm_num_groups=8, sample_size=32, shift_factor=0.0,
    )
    # No Gemma2 tokenizer can be built offline: the text encoder is absent and callers pass prompt_embeds.
    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                           text_encoder=None, tokenizer=None)


def _build_aura_flow():
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=_TEXT_DIM, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=256,
    )
    return AuraFlowPipeline(
        tokenizer=t5_tokenizer(), text_encoder=_umt5_encoder(), vae=_vae(), transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _build_chroma():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_TEXT_DIM, axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    )
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0), text_encoder=_t5_encoder(),
        tokenizer=t5_tokenizer(), transformer=transformer,
    )


def _build_qwen_image():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 4, 8),
    )
    # One spatial down-sampling: the VAE scale factor is 2, so an 8x8 image is a 4x4 latent (2x2 tokens).
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=16, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
    )
    # No Qwen2.5-VL tokenizer can be built offline: the text encoder is absent and callers pass prompt_embeds.
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        transformer=transformer,
    )


def _build_bria():
    from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_TEXT_DIM, axes_dims_rope=[4, 4, 8],
    )
    return BriaPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0),
        text_encoder=_t5_encoder(), tokenizer=t5_tokenizer(),
    )


def _build_ovis_image():
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel

    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 4, 8),
    )
    # No Qwen3 tokenizer can be built offline: the text encoder is absent and callers pass prompt_embeds.
    return OvisImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0), text_encoder=None, tokenizer=None,
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[..., Any]] = {
    "dit": _build_dit,
    "pixart-alpha": lambda: _build_pixart("PixArtAlphaPipeline"),
    "pixart-sigma": lambda: _build_pixart("PixArtSigmaPipeline"),
    "sd3": _build_sd3,
    "flux": _build_flux,
    "wan": _build_wan,
    "wan2.2": lambda: _build_wan(two_stage=True),
    "cogvideox": _build_cogvideox,
    "skyreels-v2": _build_skyreels_v2,
    "ltx-video": _build_ltx_video,
    "allegro": _build_allegro,
    "hunyuan-video": _build_hunyuan_video,
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "sana": _build_sana,
    "flux2": _build_flux2,
    "lumina2": _build_lumina2,
    "aura-flow": _build_aura_flow,
    "chroma": _build_chroma,
    "qwen-image": _build_qwen_image,
    "bria": _build_bria,
    "ovis-image": _build_ovis_image,
    "cogview3plus": _build_cogview3plus,
    "easyanimate": _build_easyanimate,
}

FAMILIES: tuple[str, ...] = tuple(_BUILDERS)

VIDEO_FAMILIES: frozenset[str] = frozenset({
    "wan", "wan2.2", "cogvideox", "hunyuan-video", "skyreels-v2", "ltx-video", "allegro", "easyanimate",
})

# Families whose text encoder cannot be built offline: their pipelines have none and callers pass prompt_embeds.
PROMPT_EMBEDS_FAMILIES: frozenset[str] = frozenset({
    "hunyuan-video", "sana", "flux2", "lumina2", "qwen-image", "ovis-image", "easyanimate",
})


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise ValueError(f"Unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}.")


def build(family: str, seed: int = 0):
    """A random-init tiny pipeline of ``family`` (one of ``FAMILIES``), in eval mode on the CPU.

    The same ``seed`` gives the same weights, so two builds are two identical, independent instances.
    """
    _check_family(family)
    _seeded(seed)
    return ready_for_inference(_BUILDERS[family]())


def example_inputs(
    family: str,
    *,
    batch_size: int = 1,
    num_inference_steps: int = 3,
    guidance: bool = True,
    size: int | None = None,
    num_frames: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Call kwargs that run ``build(family)``: ``pipe(**example_inputs(family))``.

    ``guidance`` switches classifier-free guidance on or off; ``size`` is the image height = width in pixels and
    ``num_frames`` the video length, each left at the family's smallest valid value when ``None``.
    """
    _check_family(family)
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs: dict[str, Any] = {"num_inference_steps": num_inference_steps, "generator": generator}
    prompts = ["a photo of a cat", "a red bicycle"] * batch_size
    if family == "dit":
        return {**kwargs, "class_labels": [(3 * i + 1) % 10 for i in range(batch_size)], "output_type": "np",
                "guidance_scale": 4.0 if guidance else 1.0}
    kwargs["output_type"] = "np"
    if family in ("pixart-alpha", "pixart-sigma", "sd3", "sd15", "sdxl", "aura-flow", "cogview3plus"):
        extra = {} if family in ("sd15", "sdxl") else {"max_sequence_length": 32}
        if family.startswith("pixart"):
            extra.update(use_resolution_binning=False, clean_caption=False)
        return {**kwargs, "prompt": prompts[:batch_size], "height": size or 8, "width": size or 8,
                "guidance_scale": 4.5 if guidance else 1.0, **extra}
    if family == "bria":
        return {**kwargs, "prompt": prompts[:batch_size], "height": size or 8, "width": size or 8,
                "max_sequence_length": 32, "guidance_scale": 5.0 if guidance else 1.0}
    if family == "chroma":
        return {**kwargs, "prompt": prompts[:batch_size], "height": size or 8, "width": size or 8,
                "max_sequence_length": 32, "negative_prompt": ["blurry"] * batch_size,
                "guidance_scale": 4.0 if guidance else 1.0}
    if family == "flux":
        return {**kwargs, "prompt": prompts[:batch_size], "height": size or 8, "width": size or 8,
                "max_sequence_length": 32, "negative_prompt": ["blurry"] * batch_size,
                "true_cfg_scale": 4.0 if guidance else 1.0}
    if family in ("wan", "wan2.2", "skyreels-v2"):
        return {**kwargs, "prompt": prompts[:batch_size], "height": size or 16, "width": size or 16,
                "num_frames": num_frames or 5, "guidance_scale": 5.0 if guidance else 1.0, "max_sequence_length": 32}
    if family == "ltx-video":  # LTXPipeline takes sizes in multiples of 32 only
        return {**kwargs, "prompt": prompts[:batch_size], "height": size or 32, "width": size or 32,
                "num_frames": num_frames or 5, "guidance_scale": 3.0 if guidance else 1.0, "max_sequence_length": 32}
    if family == "allegro":
        return {**kwargs, "prompt": prompts[:batch_size], "height": size or 16, "width": size or 16,
                "num_frames": num_frames or 5, "guidance_scale": 7.5 if guidance else 1.0, "max_sequence_length": 32,
                "clean_caption": False}
    if family == "cogvideox":
        return {**kwargs, "prompt": prompts[:batch_size], "height": size or 32, "width": size or 32,
                "num_frames": num_frames or 9, "guidance_scale": 6.0 if guidance else 1.0, "max_sequence_length": 32}
    if family == "hunyuan-video":
        embed_generator = torch.Generator("cpu").manual_seed(1234)
        embeds = torch.randn(batch_size, 8, 16, generator=embed_generator)
        pooled = torch.randn(batch_size, 8, generator=embed_generator)
        mask = torch.ones(batch_size, 8, dtype=torch.long)
        extra = {}
        if guidance:
            extra = {"negative_prompt_embeds": torch.zeros_like(embeds), "true_cfg_scale": 4.0,
                     "negative_pooled_prompt_embeds": torch.zeros_like(pooled),
                     "negative_prompt_attention_mask": mask.clone()}
        return {**kwargs, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask,
                "height": size or 16, "width": size or 16, "num_frames": num_frames or 5, **extra}
    if family == "sana":
        return {**kwargs, **_prompt_embeds(batch_size, tokens=8, dim=_TEXT_DIM, guidance=guidance),
                "negative_prompt": None, "height": size or 32, "width": size or 32,
                "guidance_scale": 4.5 if guidance else 1.0, "use_resolution_binning": False}
    if family == "flux2":  # guidance-distilled: guidance_scale is embedded, one denoiser call per step
        embeds = _prompt_embeds(batch_size, tokens=8, dim=_TEXT_DIM, guidance=False)["prompt_embeds"]
        return {**kwargs, "prompt_embeds": embeds, "height": size or 8, "width": size or 8,
                "guidance_scale": 4.0 if guidance else 1.0}
    if family == "lumina2":
        return {**kwargs, **_prompt_embeds(batch_size, tokens=8, dim=_TEXT_DIM, guidance=guidance),
                "height": size or 32, "width": size or 32, "guidance_scale": 4.0 if guidance else 1.0}
    if family == "qwen-image":
        embeds = torch.randn(batch_size, 8, 16, generator=torch.Generator("cpu").manual_seed(1234))
        mask = torch.ones(batch_size, 8, dtype=torch.long)
        extra = {}
        if guidance:
            extra = {"negative_prompt_embeds": torch.zeros_like(embeds), "negative_prompt_embeds_mask": mask.clone()}
        return {**kwargs, "prompt_embeds": embeds, "prompt_embeds_mask": mask, "height": size or 8,
                "width": size or 8, "true_cfg_scale": 4.0 if guidance else 1.0, **extra}
    if family == "ovis-image":
        embeds = torch.randn(batch_size, 8, 16, generator=torch.Generator("cpu").manual_seed(1234))
        # negative_prompt=None: the pipeline's default "" would be a second, conflicting negative input
        extra = {"negative_prompt_embeds": torch.zeros_like(embeds)} if guidance else {}
        return {**kwargs, "prompt_embeds": embeds, "negative_prompt": None, "height": size or 8, "width": size or 8,
                "guidance_scale": 5.0 if guidance else 1.0, **extra}
    if family == "easyanimate":
        embed_generator = torch.Generator("cpu").manual_seed(1234)
        embeds = torch.randn(batch_size, 8, 16, generator=embed_generator)
        mask = torch.ones(batch_size, 8, dtype=torch.long)
        extra = {}
        if guidance:
            extra = {"negative_prompt_embeds": torch.zeros_like(embeds),
                     "negative_prompt_attention_mask": mask.clone()}
        return {**kwargs, "prompt_embeds": embeds, "prompt_attention_mask": mask, "height": size or 16,
                "width": size or 16, "num_frames": num_frames or 5, "guidance_scale": 5.0 if guidance else 1.0,
                **extra}
    raise AssertionError(family)


def _prompt_embeds(batch_size: int, *, tokens: int, dim: int, guidance: bool) -> dict[str, Any]:
    """Seeded ``prompt_embeds`` with an all-ones attention mask, and zero negative embeds when ``guidance``."""
    generator = torch.Generator("cpu").manual_seed(1234)
    embeds = torch.randn(batch_size, tokens, dim, generator=generator)
    mask = torch.ones(batch_size, tokens, dtype=torch.long)
    kwargs: dict[str, Any] = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
    if guidance:
        kwargs.update(negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=mask.clone())
    return kwargs
