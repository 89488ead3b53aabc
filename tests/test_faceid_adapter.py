"""FaceID adapters without ComfyUI: the registry rows and presets, what the tensors tell (detection, validation,
the unified loader's file scan), the projections against diffusers', the token math (portrait's several faces,
plusv2's shortcut, unnorm's raw embedding), FaceID embeds through Save/Load Embeds and combine, and the one-line
refusals."""
import pytest
import torch

from devtools.adapter_factory import random_adapter, random_faceid_adapter
from ipadapter import faceid, model_scan, registry
from ipadapter.adapter_file import AdapterFormatError, IPAdapterCheckpoint, check_encoder, save_adapter
from ipadapter.faces import FaceEmbeds
from ipadapter.image_prompt import EncodedImages, combine_embeds, image_tokens, tokens_per_reference

WIDTH = 64
FACEID_PRESETS = {"faceid": ("SD1.5", "SDXL"), "faceid-plus": ("SD1.5",), "faceid-plusv2": ("SD1.5", "SDXL"),
                  "faceid-portrait": ("SD1.5", "SDXL"), "faceid-portrait-unnorm": ("SDXL",)}


def face_embeds(count=1, seed=0, norm=25.0):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.nn.functional.normalize(torch.randn(count, 512, generator=generator), dim=-1)
    return FaceEmbeds(embeds=embeds, norms=torch.full((count,), norm) + torch.arange(count), crops=torch.zeros(count, 8, 8, 3),
                      boxes=torch.zeros(count, 4), landmarks=torch.zeros(count, 5, 2), scores=torch.ones(count),
                      detector_sizes=(640,) * count)


def crop_features(count=1, seed=1, tokens=17, hidden=1280):
    generator = torch.Generator().manual_seed(seed)
    return EncodedImages(torch.randn(count, 1024, generator=generator), torch.randn(count, tokens, hidden, generator=generator),
                         torch.zeros(1, 1024), torch.randn(1, tokens, hidden, generator=generator), "ViT-H/14")


def loaded(variant, source, family="sd15", **kwargs):
    nested = random_faceid_adapter(variant, base_width=WIDTH, family=family, **kwargs)
    checkpoint = IPAdapterCheckpoint.from_state_dicts(**nested, source=source, base_width=None)
    return checkpoint, checkpoint.build_projection()


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --- the registry --------------------------------------------------------------------------


def test_presets_name_the_faceid_variants_and_their_released_files():
    for preset, offered in FACEID_PRESETS.items():
        variant_name, encoder = registry.PRESETS[preset]
        assert (variant_name, encoder) == (preset, "vit-h")
        families = [family for family in registry.families() if preset in family.released_adapters]
        assert tuple(family.name for family in families) == offered
        for family in families:
            variant = registry.variant_by_name(variant_name, family)
            assert variant.takes_faces and not variant.trainable
            stem = registry.export_stem(variant, family, registry.encoder_by_id(family.native_encoder))
            assert stem in family.released_adapters[preset], (stem, family.released_adapters[preset])
    assert registry.variant_by_name("faceid-plusv2").shortcut and not registry.variant_by_name("faceid-plus").shortcut
    assert [v.name for v in registry.VARIANTS if v.lora] == ["faceid", "faceid-plus", "faceid-plusv2"]


# --- what the tensors tell -------------------------------------------------------------------

DETECTED = {  # variant, family, file name -> (spec.variant, projection, tokens, encoder_input, face_input, variant_of)
    ("faceid", "sd15", "ip-adapter-faceid_sd15.bin"): ("faceid", "faceid", 4, "face_embeds", "normed", "faceid"),
    ("faceid-plus", "sd15", "ip-adapter-faceid-plus_sd15.bin"):
        ("faceid-plus", "faceid-plus", 4, "penultimate", "normed", "faceid-plus"),
    ("faceid-plus", "sd15", "ip-adapter-faceid-plusv2_sd15.bin"):
        ("faceid-plus", "faceid-plus", 4, "penultimate", "normed", "faceid-plusv2"),
    ("faceid-portrait", "sd15", "ip-adapter-faceid-portrait-v11_sd15.bin"):
        ("faceid-portrait", "faceid-portrait", 16, "face_embeds", "normed", "faceid-portrait"),
    ("faceid", "sdxl", "ip-adapter-faceid_sdxl.bin"): ("faceid", "faceid", 4, "face_embeds", "normed", "faceid"),
    ("faceid-portrait", "sdxl", "ip-adapter-faceid-portrait_sdxl.bin"):
        ("faceid-portrait", "faceid-portrait", 16, "face_embeds", "normed", "faceid-portrait"),
    ("faceid-portrait-unnorm", "sdxl", "ip-adapter-faceid-portrait_sdxl_unnorm.bin"):
        ("faceid-portrait-unnorm", "faceid-resampler", 16, "face_embeds", "raw", "faceid-portrait-unnorm"),
}
SERVES = {"faceid": ["faceid"], "faceid-plus": ["faceid-plus", "faceid-plusv2"], "faceid-portrait": ["faceid-portrait"],
          "faceid-portrait-unnorm": ["faceid-portrait-unnorm"]}


@pytest.mark.parametrize("case", list(DETECTED), ids=lambda case: case[2])
def test_detects_faceid_variants_from_their_tensors(tmp_path, case):
    variant, family, name = case
    checkpoint, _ = loaded(variant, name, family, rank=8)
    spec = checkpoint.spec
    assert (spec.variant, spec.projection, spec.num_tokens, spec.encoder_input, spec.face_input,
            faceid.variant_of(checkpoint).name) == DETECTED[case]
    assert spec.architecture.id == family and spec.base_width == WIDTH and spec.face_width == 512
    assert spec.lora_rank == (8 if variant in ("faceid", "faceid-plus") else 0)
    assert "InsightFace ArcFace face embedding 512-d" in spec.describe()
    assert ("OpenCLIP ViT-H/14 penultimate 1280-d" in spec.describe()) == (variant == "faceid-plus")

    path = save_adapter(checkpoint, tmp_path / name.replace(".bin", ".safetensors"))  # the scan reads shapes only
    kind = model_scan.classify(path)
    assert kind.kind == "adapter" and model_scan.presets_served(kind) == SERVES[variant], kind


def test_the_unified_loader_scan_tells_faceid_files_from_the_others(tmp_path):
    folder = tmp_path / "ipadapter"
    files = {}
    for variant, name in (("faceid", "ip-adapter-faceid_sd15.bin"), ("faceid-plus", "ip-adapter-faceid-plus_sd15.bin"),
                          ("faceid-plus", "ip-adapter-faceid-plusv2_sd15.bin"),
                          ("faceid-portrait", "ip-adapter-faceid-portrait-v11_sd15.bin")):
        checkpoint, _ = loaded(variant, name)
        files[name] = str(save_adapter(checkpoint, folder / name))
    plus = IPAdapterCheckpoint.from_state_dicts(**random_adapter("plus", base_width=WIDTH), base_width=None)
    files["ip-adapter-plus_sd15.bin"] = str(save_adapter(plus, folder / "ip-adapter-plus_sd15.bin"))
    sd15 = registry.family_by_id("sd15")
    for preset, wanted in (("faceid", "ip-adapter-faceid_sd15.bin"), ("faceid-plus", "ip-adapter-faceid-plus_sd15.bin"),
                           ("faceid-plusv2", "ip-adapter-faceid-plusv2_sd15.bin"),
                           ("faceid-portrait", "ip-adapter-faceid-portrait-v11_sd15.bin"),
                           ("plus", "ip-adapter-plus_sd15.bin")):
        assert model_scan.pick_adapter(sd15, preset, files, [str(folder)]).name == wanted
    with pytest.raises(model_scan.NotFound) as error:
        model_scan.pick_adapter(sd15, "faceid-portrait-unnorm", files, [str(folder)])
    assert_one_line(error, "preset 'faceid-portrait-unnorm' has no SD1.5 adapter")


def test_adapter_file_round_trip_keeps_the_lora(tmp_path):
    checkpoint, _ = loaded("faceid", "ip-adapter-faceid_sd15.bin")
    from ipadapter.adapter_file import load_adapter

    for suffix in (".bin", ".safetensors"):
        again = load_adapter(save_adapter(checkpoint, tmp_path / f"ip-adapter-faceid_sd15{suffix}", dtype=None),
                             base_width=None)
        assert again.spec == checkpoint.spec
        assert again.lora_tensors().keys() == checkpoint.lora_tensors().keys() == set(range(32))


# --- the projections ---------------------------------------------------------------------------


def diffusers_projection(checkpoint):
    """diffusers' own image projection of these ``image_proj`` tensors (its FaceID / FaceID plus / plus branches)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        None, dict(checkpoint.image_proj), low_cpu_mem_usage=False).eval()


@pytest.mark.parametrize("variant, family", [("faceid", "sd15"), ("faceid-portrait", "sdxl"),
                                             ("faceid-portrait-unnorm", "sdxl"), ("faceid-plus", "sd15")])
def test_projections_match_diffusers(variant, family):
    checkpoint, projection = loaded(variant, f"{variant}.bin", family)
    faces = face_embeds(2)
    theirs = diffusers_projection(checkpoint)
    with torch.no_grad():
        if variant == "faceid-plus":
            clip = crop_features(2)
            theirs.clip_embeds = clip.penultimate[:, None]  # [batch, images, tokens, width]
            theirs.shortcut, theirs.shortcut_scale = True, 0.8
            ours = faceid.project_faces(checkpoint, projection, faces.embeds, clip.penultimate, 0.8)
        elif variant == "faceid-portrait-unnorm":
            ours = faceid.project_faces(checkpoint, projection, faces.raw_embeds)
            theirs_out = theirs(faces.raw_embeds[:, None])
        else:
            ours = faceid.project_faces(checkpoint, projection, faces.embeds)
        if variant != "faceid-portrait-unnorm":
            theirs_out = theirs(faces.embeds)
    assert ours.shape == (2, checkpoint.spec.num_tokens, 768 if family == "sd15" else 2048)
    torch.testing.assert_close(ours, theirs_out, rtol=1e-5, atol=1e-5)


# --- the token math ------------------------------------------------------------------------------


def test_portrait_puts_several_faces_side_by_side():
    checkpoint, projection = loaded("faceid-portrait", "ip-adapter-faceid-portrait-v11_sd15.bin")
    faces = face_embeds(3)
    images = faceid.faceid_embeds(faces)  # no image encoder: portrait reads the face embeddings only
    cond, uncond = image_tokens(checkpoint, projection, images, None, "concat")
    assert cond.shape == uncond.shape == (1, 48, 768)
    with torch.no_grad():
        each = projection(faces.embeds)
        zero = projection(torch.zeros(1, 512))
    torch.testing.assert_close(cond, each.reshape(1, 48, 768))
    torch.testing.assert_close(uncond, zero.repeat(1, 3, 1))
    averaged, uncond = image_tokens(checkpoint, projection, images, None, "average")
    assert averaged.shape == uncond.shape == (1, 16, 768)
    with torch.no_grad():
        torch.testing.assert_close(averaged, projection(faces.embeds.mean(0, keepdim=True)))
    per_face, uncond = tokens_per_reference(checkpoint, projection, images, None)
    assert per_face.shape == (3, 16, 768) and uncond.shape == (1, 16, 768)


def test_unnorm_reads_the_raw_embedding():
    checkpoint, projection = loaded("faceid-portrait-unnorm", "ip-adapter-faceid-portrait_sdxl_unnorm.bin", "sdxl")
    faces = face_embeds(1, norm=30.0)
    cond, _ = image_tokens(checkpoint, projection, faceid.faceid_embeds(faces), None, "concat")
    with torch.no_grad():
        torch.testing.assert_close(cond, projection(faces.raw_embeds[:, None]))
        assert (cond - projection(faces.embeds[:, None])).abs().max() > 1e-3


def test_plusv2_shortcut_is_set_when_applied():
    checkpoint, projection = loaded("faceid-plus", "ip-adapter-faceid-plusv2_sd15.bin")
    faces, clip = face_embeds(1), crop_features(1)
    images = faceid.faceid_embeds(faces, clip)
    with torch.no_grad():
        ids = projection.id_tokens(faces.embeds)
        refined = projection.perceiver_resampler(ids, clip.penultimate)
    for scale in (None, 0.0, 2.5):
        cond, uncond = image_tokens(checkpoint, projection, images, None, "concat", shortcut_scale=scale)
        torch.testing.assert_close(cond, ids + (1.0 if scale is None else scale) * refined)
    with torch.no_grad():  # the unconditional half: a zero face and the blank image's crop features
        zero_ids = projection.id_tokens(torch.zeros(1, 512))
        torch.testing.assert_close(uncond, zero_ids + 2.5 * projection.perceiver_resampler(zero_ids, clip.uncond_penultimate))

    v1, v1_projection = loaded("faceid-plus", "ip-adapter-faceid-plus_sd15.bin")
    cond, _ = image_tokens(v1, v1_projection, images, None, "concat", shortcut_scale=2.5)  # v1: no shortcut
    with torch.no_grad():
        torch.testing.assert_close(cond, v1_projection.perceiver_resampler(v1_projection.id_tokens(faces.embeds),
                                                                           clip.penultimate))
    # without a negative image the blank image's features come from the encoder, as for plus
    blank = torch.randn(1, 17, 1280)
    images.uncond_penultimate = None
    _, uncond = image_tokens(checkpoint, projection, images, blank, "concat")
    with torch.no_grad():
        torch.testing.assert_close(uncond, projection(torch.zeros(1, 512), blank, 1.0))


# --- FaceID embeds: Save/Load Embeds and combine ---------------------------------------------------


def test_faceid_embeds_survive_save_load_and_combine():
    faces, clip = face_embeds(2), crop_features(2)
    images = faceid.faceid_embeds(faces, clip)
    assert images.has_faces and images.has_clip_features and len(images) == 2
    again = EncodedImages.from_state_dict(images.state_dict(), "ViT-H/14", "faces.safetensors")
    for name in ("image_embeds", "penultimate", "uncond_penultimate", "face_embeds", "raw_face_embeds"):
        assert torch.equal(getattr(again, name), getattr(images, name)), name
    torch.testing.assert_close(again.raw_face_embeds, faces.raw_embeds)

    plain = EncodedImages.from_state_dict({"image_embeds": torch.zeros(1, 1024), "penultimate": torch.zeros(1, 257, 1280)},
                                          "ViT-H/14", "old.safetensors")  # saved before FaceID: still loads
    assert not plain.has_faces
    half = {name: tensor for name, tensor in images.state_dict().items() if name != "raw_face_embeds"}
    with pytest.raises(ValueError) as error:
        EncodedImages.from_state_dict(half, "ViT-H/14", "half.safetensors")
    assert_one_line(error, "'half.safetensors' holds face_embeds but no raw_face_embeds")

    concat = combine_embeds([images, faceid.faceid_embeds(face_embeds(1, seed=3), crop_features(1, seed=4))], "concat")
    assert concat.face_embeds.shape == (3, 512) and concat.penultimate.shape[0] == 3
    averaged = combine_embeds([images], "average")
    torch.testing.assert_close(averaged.face_embeds, faces.embeds.mean(0, keepdim=True))
    torch.testing.assert_close(averaged.raw_face_embeds, faces.raw_embeds.mean(0, keepdim=True))
    weighted = images.weighted([0.5, 2.0])
    torch.testing.assert_close(weighted.face_embeds, faces.embeds * torch.tensor([[0.5], [2.0]]))
    with pytest.raises(ValueError) as error:
        combine_embeds([images, crop_features(1)], "concat")
    assert_one_line(error, "holds face embeddings (FaceID) and the other does not")


# --- one-line refusals -------------------------------------------------------------------------------


def test_faceid_refusals_are_one_line():
    faceid_checkpoint, faceid_projection = loaded("faceid", "ip-adapter-faceid_sd15.bin")
    with pytest.raises(ValueError) as error:  # plain CLIP embeds: no face embeddings
        image_tokens(faceid_checkpoint, faceid_projection, crop_features(1), None)
    assert_one_line(error, "'ip-adapter-faceid_sd15.bin' is a FaceID adapter (faceid) that takes InsightFace ArcFace "
                           "face embeddings", "ViT-H/14 image features only", "faceid_embeds")

    plus, plus_projection = loaded("faceid-plus", "ip-adapter-faceid-plusv2_sd15.bin")
    with pytest.raises(ValueError) as error:  # faces without the crops' CLIP features
        image_tokens(plus, plus_projection, faceid.faceid_embeds(face_embeds(1)), None)
    assert_one_line(error, "(faceid-plus) also reads the OpenCLIP ViT-H/14 hidden states of the aligned face crops")
    with pytest.raises(AdapterFormatError) as error:  # the crops seen by another encoder
        image_tokens(plus, plus_projection, faceid.faceid_embeds(face_embeds(1), crop_features(1, hidden=1664)), None)
    assert_one_line(error, "hidden states of width 1280", "gives 1664")

    base = IPAdapterCheckpoint.from_state_dicts(**random_adapter("base"), source="ip-adapter_sd15.bin")
    with pytest.raises(ValueError) as error:  # a plain adapter given face embeddings only
        image_tokens(base, base.build_projection(), faceid.faceid_embeds(face_embeds(1)), None)
    assert_one_line(error, "the embeds hold face embeddings only", "'ip-adapter_sd15.bin' (base) takes OpenCLIP ViT-H/14")

    with pytest.raises(ValueError) as error:  # CLIP image embeds given as face embeddings
        faceid.faceid_embeds(type("Faces", (), {"embeds": torch.randn(1, 1024), "norms": torch.ones(1)})())
    assert_one_line(error, "the face embeddings have shape [1, 1024]", "expected [faces, 512] InsightFace ArcFace")
    check_encoder(faceid_checkpoint.spec, 1280, 1664, faceid_checkpoint.source, "ViT-bigG/14")  # reads no CLIP


def test_faceid_file_refusals_are_one_line():
    nested = random_faceid_adapter("faceid", base_width=WIDTH)
    nested["image_proj"] = random_adapter("base")["image_proj"]
    with pytest.raises(AdapterFormatError) as error:
        IPAdapterCheckpoint.from_state_dicts(**nested, source="mixed.bin", base_width=None)
    assert_one_line(error, "'mixed.bin' carries LoRA tensors (ip_adapter.0.to_q_lora.down.weight) beside a base projection")

    nested = random_faceid_adapter("faceid", base_width=WIDTH)
    del nested["ip_adapter"]["6.to_v_lora.up.weight"]
    with pytest.raises(AdapterFormatError) as error:
        IPAdapterCheckpoint.from_state_dicts(**nested, source="cut.bin", base_width=None)
    assert_one_line(error, "the LoRA of attention processor 6 (down_blocks.1.attentions.1.transformer_blocks.0.attn1) "
                           "lacks to_v_lora.up.weight")

    nested = random_faceid_adapter("faceid", base_width=WIDTH)
    nested["ip_adapter"]["7.to_k_lora.down.weight"] = torch.zeros(4, WIDTH)
    with pytest.raises(AdapterFormatError) as error:
        IPAdapterCheckpoint.from_state_dicts(**nested, source="odd.bin", base_width=None)
    assert_one_line(error, "ip_adapter.7.to_k_lora.down.weight is [4, 64], expected [4, 768]")

    nested = random_faceid_adapter("faceid-portrait", base_width=WIDTH)
    nested["ip_adapter"].update({k: v for k, v in random_faceid_adapter("faceid", base_width=WIDTH)["ip_adapter"].items()
                                 if "lora" in k})
    with pytest.raises(AdapterFormatError) as error:  # 16 tokens with a LoRA: neither faceid nor portrait
        IPAdapterCheckpoint.from_state_dicts(**nested, source="both.bin", base_width=None)
    assert_one_line(error, "'both.bin' is a FaceID adapter", "makes 16 tokens and carries a LoRA",
                    "faceid: 4 tokens, with a LoRA; faceid-portrait: 16 tokens, no LoRA")
