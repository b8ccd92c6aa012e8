"""Home: what the lab is for, and digits from the loaded model."""
from __future__ import annotations

import streamlit as st

from analysis.app_state import HOME_CLASSES
from analysis.sampling import NO_CLASS
from pages._shared import current_bundle, progress_callback

st.title("dqlab: quantizing diffusion models")
st.markdown(
    "Diffusion transformers (DiT) are expensive to run. Quantizing their weights and activations to 8 or 4 bits "
    "makes them cheaper, but a few **outlier channels** stretch the quantization range and drown every other "
    "channel in rounding error, and in a diffusion model the outliers move as the denoising **timestep** changes. "
    "This lab lets you\n"
    "- **Salience**: see, per layer and timestep, which channels carry extreme values (PTQ4DiT, Wu et al., 2024);\n"
    "- **Quantize**: apply plain PTQ, SmoothQuant, PTQ4DiT's channel salience balancing, or DilateQuant's weight "
    "dilation with per-timestep quantizers, at the bit-widths you choose;\n"
    "- **Compare**: generate the same seeds with each variant side by side, with FID.\n\n"
    "The bundled models are a small DiT and a small UNet trained on MNIST digits (`bundled:dit-mnist`, "
    "`bundled:unet-mnist`: pick one in the sidebar), so everything runs on a CPU in seconds.")

bundle = current_bundle()
if bundle is not None:
    n_params = sum(p.numel() for p in bundle.transformer.parameters())
    st.caption(f"Model `{bundle.name}` on {bundle.device}: {n_params / 1e6:.1f}M parameters, {bundle.describe()}")
    with st.form("home_sample"):
        c1, c2, c3 = st.columns(3)
        steps = c1.slider("DDIM steps", 10, 100, 50, step=10)
        # an unconditional model has no guidance: the slider is pinned at 1
        guidance = c2.slider("Guidance", 1.0, 8.0 if bundle.conditional else 1.0, float(bundle.default_guidance),
                             step=0.5, disabled=not bundle.conditional)
        n_seeds = c3.number_input("Seeds per class" if bundle.conditional else "Rows of seeds", 1, 8, 3)
        go = st.form_submit_button("Generate")
    # an unconditional model fills each row with 10 seeds instead of 10 classes
    classes = HOME_CLASSES[:bundle.num_classes] if bundle.conditional else [NO_CLASS] * len(HOME_CLASSES)
    key = ("home_grid", bundle.name)
    if go or key not in st.session_state:
        from analysis.images import make_grid
        from analysis.sampling import sample

        seeds = list(range(int(n_seeds)))
        bar, on_step = progress_callback("Sampling: step")
        # Seed-major order so each row of the grid is one seed and each column one class.
        seed_list = [s for s in seeds for _ in classes] if bundle.conditional else list(range(len(classes) * len(seeds)))
        result = sample(bundle, classes * len(seeds), seed_list, steps=steps, guidance=guidance, on_step=on_step)
        bar.empty()
        st.session_state[key] = (make_grid(result.images, ncol=len(classes)), result.seconds, steps, guidance)
    grid, seconds, steps_used, guidance_used = st.session_state[key]
    layout = f"Columns: classes {classes[0]}-{classes[-1]}; rows: seeds" if bundle.conditional else "Seeds 0, 1, ..."
    st.image(grid, caption=f"{layout}. {steps_used} DDIM steps, guidance {guidance_used}, {seconds:.1f} s")
