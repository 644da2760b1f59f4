"""03_conversion.ipynb: HF -> orbax -> HF with a parity check."""

from __future__ import annotations

from nb_cells import INSTALL_CELL, RUNTIME_CELL, TINY_CHECKPOINT, code, header, md


def conversion():
    return [
        header("Checkpoint conversion: Hugging Face → orbax → Hugging Face, with a parity check", """\
apriel-jax reads and writes three formats: Hugging Face (`LlavaForConditionalGeneration` with a Pixtral
vision tower), Mistral consolidated, and its own orbax checkpoints (sharded, restorable onto any mesh).
This notebook

1. builds a tiny HF checkpoint (or takes yours: `HF_CHECKPOINT`);
2. converts it to orbax (`hf_to_orbax`) and back (`orbax_to_hf`);
3. checks that every tensor comes back **byte for byte**, with the config and tokenizer files;
4. compares our logits with those of transformers' `LlavaForConditionalGeneration` on a prompt with an
   image (when torch and transformers are installed; skipped otherwise).

The same conversions exist on the command line:
`apriel-jax convert hf-to-orbax SRC DST` and `apriel-jax convert orbax-to-hf SRC DST [--dtype bfloat16]`."""),
        code(INSTALL_CELL),
        code(RUNTIME_CELL + """\
# Full-precision fp32 matmuls: TPUs and GPUs otherwise round them (bf16 passes / TF32), which the parity
# check below would measure instead of the conversion.
jax.config.update("jax_default_matmul_precision", "highest")"""),
        code(TINY_CHECKPOINT),
        code("""\
HF_CHECKPOINT = ""  # @param {type:"string"}
WORK = Path("runs/notebooks/conversion")

if not HF_CHECKPOINT:
    HF_CHECKPOINT = str(build_tiny_checkpoint(WORK / "hf"))
print(HF_CHECKPOINT, "->", describe(HF_CHECKPOINT))"""),
        md("""\
## HF → orbax → HF

Conversion streams one tensor at a time (host memory stays near the largest tensor beyond the model);
outputs are written under a temporary name and renamed into place. The orbax directory keeps the source's
`config.json` (as `hf_config.json`) and its tokenizer files, so token ids and tokenizer survive the round
trip."""),
        code("""\
import time

from apriel_jax.checkpoint.pretrained import hf_to_orbax, orbax_to_hf

ORBAX_DIR, HF_BACK = WORK / "orbax", WORK / "hf_roundtrip"
t0 = time.time()
hf_to_orbax(HF_CHECKPOINT, ORBAX_DIR, overwrite=True)
print(f"hf_to_orbax  {time.time() - t0:5.1f} s -> {ORBAX_DIR}: {sorted(p.name for p in ORBAX_DIR.iterdir())}")
t0 = time.time()
orbax_to_hf(ORBAX_DIR, HF_BACK, overwrite=True)
print(f"orbax_to_hf  {time.time() - t0:5.1f} s -> {HF_BACK}: {describe(HF_BACK)}")"""),
        md("""\
## Byte-for-byte comparison

Every tensor of the original and of the round trip: same names, dtypes, shapes and bytes."""),
        code("""\
from safetensors import safe_open


def read_tensors(path):
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


a, b = read_tensors(HF_CHECKPOINT), read_tensors(HF_BACK)
assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
assert not differ, f"tensors changed in the round trip: {differ[:5]}"
print(f"{len(a)} tensors bit-identical ({sum(x.nbytes for x in a.values()) / 1e6:.2f} MB, "
      f"dtypes {sorted({str(x.dtype) for x in a.values()})})")
for fname in ("config.json", "tokenizer.json"):
    if (Path(HF_CHECKPOINT) / fname).is_file():
        same = (Path(HF_CHECKPOINT) / fname).read_bytes() == (HF_BACK / fname).read_bytes()
        print(f"{fname}: {'identical' if same else 'DIFFERENT'}")
        assert same
print("examples:", ", ".join(f"{k} {list(a[k].shape)}" for k in sorted(a)[:3]))"""),
        md("""\
## bfloat16

Exporting with `dtype="bfloat16"` halves the size; a bfloat16 checkpoint also converts losslessly
(`hf_to_orbax` keeps the stored dtype unless `param_dtype` says otherwise)."""),
        code("""\
orbax_to_hf(ORBAX_DIR, WORK / "hf_bf16", dtype="bfloat16", overwrite=True)
hf_to_orbax(WORK / "hf_bf16", WORK / "orbax_bf16", overwrite=True)
orbax_to_hf(WORK / "orbax_bf16", WORK / "hf_bf16_roundtrip", overwrite=True)
c, d = read_tensors(WORK / "hf_bf16"), read_tensors(WORK / "hf_bf16_roundtrip")
assert c.keys() == d.keys() and all(c[k].tobytes() == d[k].tobytes() and c[k].dtype == d[k].dtype for k in c)
print(f"bfloat16: {len(c)} tensors bit-identical after HF -> orbax -> HF "
      f"({sum(x.nbytes for x in c.values()) / 1e6:.2f} MB vs {sum(x.nbytes for x in a.values()) / 1e6:.2f} MB fp32)")"""),
        md("""\
## Logits parity with transformers

One prompt with an image, built the way a transformers Pixtral processor returns it (`input_ids` with
the image's `[IMG]` / `[IMG_BREAK]` / `[IMG_END]` tokens, `pixel_values` as `[images, 3, H, W]`,
`image_sizes`); `from_hf_inputs` turns those arrays into our batch. Our model is loaded from the
round-tripped checkpoint, transformers' from the same directory. Reported: the maximum relative logits
error, `max |ours - transformers| / max |transformers|` (the test suite's limit is 1e-5 in fp32).
This compares full fp32 forward passes on the host, so it is skipped for checkpoints above 2B
parameters."""),
        code("""\
import numpy as np
from PIL import Image

from apriel_jax.data import from_hf_inputs
from apriel_jax.data.images import ImageConfig, preprocess_image
from apriel_jax.data.prompt import encode_prompt

ours_model = apriel_jax.from_pretrained(HF_BACK, dtype="float32", param_dtype="float32", mesh=mesh)
mcfg = ours_model.config
tokenizer = load_tokenizer(HF_BACK)
image_cfg = ImageConfig(longest_edge=min(256, mcfg.vision.image_size), patch_size=mcfg.vision.patch_size)
image = Image.open(DEMO_DATA / "images" / "bar_chart.png").convert("RGB")
input_ids, _ = encode_prompt([image, "Which bar is the tallest?"], tokenizer, image_cfg)
pixels = preprocess_image(image, image_cfg)  # [H, W, 3] float32, normalised (Pixtral's preprocessing)
hf_inputs = {
    "input_ids": np.asarray([input_ids], np.int64),
    "attention_mask": np.ones((1, len(input_ids)), np.int64),
    "pixel_values": pixels.transpose(2, 0, 1)[None].astype(np.float32),
    "image_sizes": np.asarray([pixels.shape[:2]], np.int64),
}
batch = from_hf_inputs(hf_inputs["input_ids"], hf_inputs["pixel_values"], hf_inputs["image_sizes"],
                       hf_inputs["attention_mask"], image_token_id=mcfg.image_token_id,
                       patch_size=mcfg.vision.patch_size, pad_id=tokenizer.pad_id)
ours = np.asarray(ours_model(batch))
print(f"prompt: {len(input_ids)} tokens, image {pixels.shape[1]}x{pixels.shape[0]} px -> "
      f"{batch['patches'].shape[1]} patches; our logits {list(ours.shape)}")"""),
        code("""\
try:
    import torch
    from transformers import LlavaForConditionalGeneration
except ImportError as e:
    torch = None
    print(f"transformers parity: skipped ({e.name or 'torch/transformers'} is not installed; "
          "pip install torch transformers to run it)")

if torch is not None and param_count(mcfg) > 2e9:
    print("transformers parity: skipped (a checkpoint this size needs more host memory than a notebook has)")
elif torch is not None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ref_model = LlavaForConditionalGeneration.from_pretrained(str(HF_BACK), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(**{k: torch.as_tensor(v) for k, v in hf_inputs.items()}, use_cache=False).logits.numpy()
    rel = float(np.abs(ref - ours).max() / np.abs(ref).max())
    agree = float((ref.argmax(-1) == ours.argmax(-1)).mean())
    print(f"transformers {type(ref_model).__name__}: logits {list(ref.shape)}")
    print(f"max relative error vs transformers: {rel:.2e} (argmax agreement {agree:.0%})")
    assert rel < 1e-4, rel"""),
    ]
