"""Home: what the lab is for, and digits from the loaded model."""
from __future__ import annotations

import streamlit as st

from analysis.app_state import HOME_CLASSES
from pages._shared import current_bundle, current_prompts, intro, progress_callback

st.title("dqlab: quantizing diffusion transformers")
intro(
    "Diffusion transformers (DiT) and UNets are expensive to run; quantizing their weights and activations to 8 "
    "or 4 bits makes them cheaper, but a few **outlier channels** stretch the quantization range, and in a diffusion model "
    "they move with the denoising **timestep**. This lab lets you look at the outliers (**Salience**), quantize "
    "with plain PTQ, SmoothQuant, PTQ4DiT or DilateQuant (**Quantize**), find the setting worth shipping "
    "(**Sweep**) and compare variants side by side with FID (**Compare**).",
    why="A $b$-bit quantizer has $2^b$ levels spread over the range it must cover. One channel twenty times "
        "larger than the rest spends most of those levels on itself, and every other channel rounds coarsely. "
        "The bundled models, a small DiT and a small UNet trained on MNIST digits, run on a CPU in seconds; "
        "pick another model (a local folder or a hub id) and a device in the sidebar.",
    math=[r"\Delta = \frac{\max X - \min X}{2^b - 1}, \qquad \mathbb{E}\big[(x - \hat x)^2\big] "
          r"\approx \frac{\Delta^2}{12}"],
    links={"DiT (Peebles & Xie, ICCV 2023)": "https://arxiv.org/abs/2212.09748",
           "PTQ4DiT (Wu et al., NeurIPS 2024)": "https://arxiv.org/abs/2405.16005"})

bundle = current_bundle()
if bundle is not None:
    import time

    from analysis.app_state import HOME_GRIDS, model_key, produced_by
    from analysis.models.sampling import NO_CLASS  # torch: imported after the heading is drawn

    n_params = sum(p.numel() for p in bundle.denoiser.parameters())
    st.caption(f"Model `{bundle.name}` on {bundle.device}: {n_params / 1e6:.1f}M parameters, {bundle.describe()}")
    mkey = model_key(bundle)
    with st.form("home_sample"):
        c1, c2, c3 = st.columns(3)
        # The first grid is drawn as the page opens: small defaults keep the first page quick on a CPU.
        steps = c1.slider("DDIM steps", 10, 100, 20, step=10)
        # an unconditional model has no guidance: the slider is pinned at 1
        guidance = c2.slider("Guidance", 1.0, 8.0 if bundle.conditional else 1.0, float(bundle.default_guidance),
                             step=0.5, disabled=not bundle.conditional)
        per = "prompt" if bundle.text_conditioned else "class"
        n_seeds = c3.number_input(f"Seeds per {per}" if bundle.conditional else "Rows of seeds", 1, 8, 2)
        go = st.form_submit_button("Generate")
    prompts = current_prompts() if bundle.text_conditioned else None
    if prompts is not None:  # one column per prompt (the sidebar's), as one per class
        classes = bundle.prompt_ids(prompts)
        gkey = (mkey, tuple(prompts), bundle.negative_prompt)
    else:  # an unconditional model fills each row with 10 seeds instead of 10 classes
        classes = HOME_CLASSES[:bundle.num_classes] if bundle.conditional else [NO_CLASS] * len(HOME_CLASSES)
        gkey = mkey
    remembered = st.session_state.setdefault("home_settings", {})
    if go or gkey not in remembered:
        remembered[gkey] = (int(steps), float(guidance), int(n_seeds))
    steps_used, guidance_used, seeds_used = remembered[gkey]

    def _sample_grid():
        """The grid for these settings: the same for every session, so it is computed once per process."""
        from analysis.evaluation.images import make_grid
        from analysis.models.sampling import sample

        seeds = list(range(seeds_used))
        bar, on_step = progress_callback("Sampling: step")
        # Seed-major order so each row of the grid is one seed and each column one class.
        seed_list = [s for s in seeds for _ in classes] if bundle.conditional else list(range(len(classes) * len(seeds)))
        result = sample(bundle, classes * len(seeds), seed_list, steps=steps_used, guidance=guidance_used,
                        on_step=on_step)
        bar.empty()
        labels = ([p[:24] for p in prompts] if prompts is not None else [str(c) for c in classes]) \
            if bundle.conditional else None
        return make_grid(result.images, ncol=len(classes), col_labels=labels, target=96), result.seconds

    waiting = st.empty()
    shared = HOME_GRIDS.get((gkey, steps_used, guidance_used, seeds_used), _sample_grid,
                           on_wait=lambda: waiting.info("Another session is sampling this grid right now; it is "
                                                        "shown here as soon as it is done."))
    waiting.empty()
    grid, seconds = shared.value
    if prompts is not None:
        layout = "Columns: " + "; ".join(f"“{p}”" for p in prompts) + "; rows: seeds"
    else:
        layout = "Columns: classes (labelled); rows: seeds" if bundle.conditional else "Seeds 0, 1, ..."
    st.image(grid, caption=f"{layout}. {produced_by(mkey)}; {steps_used} DDIM steps, guidance {guidance_used}, "
                           f"sampled in {seconds:.1f} s at {time.strftime('%H:%M:%S', time.localtime(shared.computed_at))} "
                           "once for every session of this app")
