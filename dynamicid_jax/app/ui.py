"""The gradio page: people (uploads, face previews, IMR edits, boxes or masks), settings, outputs.

Named API endpoints (gradio_client, see README): `/generate` (the form), `/reproduce`
(a sidecar + fresh reference uploads), `/restore` (a sidecar -> the form's settings),
`/analyse_K` (person K's uploads -> face previews and description), `/layout`.
A run returns (files: PNG and sidecar per image, activation maps, status); the page's
gallery is filled from those files by a private follow-up event, so an API client gets
each PNG once (gradio_client downloads every file of a reply).
"""

from __future__ import annotations

import concurrent.futures
import pathlib

import gradio as gr

from dynamicid_jax import masks
from dynamicid_jax.app import forms, previews
from dynamicid_jax.app.service import AppService, Cancelled
from dynamicid_jax.dynamicid.saa import default_boxes
from dynamicid_jax.faces import NoFaceError
from dynamicid_jax.request import TIME_ID_FIELDS, InputError
from dynamicid_jax.request_parsing import PAIR_HELP, TIME_ID_HELP, parse_box
from dynamicid_jax.schedulers import SCHEDULERS

USER_ERRORS = (InputError, NoFaceError, Cancelled)
IMAGE_TYPES = list(forms.IMAGE_SUFFIXES)
PEOPLE = range(1, forms.MAX_PEOPLE + 1)
# How long gradio's cache keeps what clients uploaded (their reference photos: people's faces)
# and the copies of the pictures it served; everything in it is deleted when the server stops.
# gradio's own default keeps them until someone empties its folder.
KEEP_FILES_MINUTES = 60


def _paths(files) -> list[str]:
    if not files:
        return []
    files = files if isinstance(files, (list, tuple)) else [files]
    return [str(getattr(f, "path", f)) for f in files]


def build_demo(service: AppService, notice: str = "") -> gr.Blocks:
    """The page for `service`; notice: a line shown on top (e.g. the demo-mode warning)."""
    d = service.settings  # every setting's page default (the config's, then SampleRequest's)
    # The request fields beyond SD1.5's that the loaded base model's family takes (SDXL: its
    # micro-conditioning time ids); the page shows only these, the API takes all (a family
    # without them refuses them with one line).
    extra_fields = service.pipeline.modules.family.request_fields
    # Threads that wait for a run; the device lock inside the service keeps one at a time.
    runner = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="dynamicid-run")
    previews_dir = service.upload_root / "previews"  # gradio's temporary tree: it may serve these

    def run_and_report(request, random_seed, with_maps, loras, progress):
        future = runner.submit(service.run, request, random_seed=random_seed, with_maps=with_maps, loras=loras)
        # The handler's thread owns gradio's progress context: it reports while the run goes on,
        # and wait() returns the moment the run ends (no polling latency on the result).
        while not concurrent.futures.wait([future], timeout=0.1).done:
            done, total = service.progress
            if total:
                progress((done, total), desc="denoising", unit="steps")
        try:
            result = future.result()
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False)
        downloads = [str(p) for pair in zip(result.images, result.sidecars) for p in pair]
        message = (f"{len(result.images)} image(s), seed {result.request.seed}, {result.seconds:.1f}s"
                   + (" (" + notice + ")" if notice else ""))
        return downloads, result.maps, message

    def gallery_of(files):
        """The run's files (as the page holds them) -> the gallery: its PNGs, captioned."""
        return [(p, pathlib.PurePath(p).name) for p in _paths(files) if p.lower().endswith(".png")]

    # Every parameter defaults to None (= the page's default) so API clients name only what they set.
    def generate(refs_1=None, box_1=None, expression_1=None, orientation_1=None, face_text_1=None, landmarks_1=None,
                 refs_2=None, box_2=None, expression_2=None, orientation_2=None, face_text_2=None, landmarks_2=None,
                 refs_3=None, box_3=None, expression_3=None, orientation_3=None, face_text_3=None, landmarks_3=None,
                 refs_4=None, box_4=None, expression_4=None, orientation_4=None, face_text_4=None, landmarks_4=None,
                 prompt=None, negative_prompt=None, seed=None, random_seed=None, steps=None, guidance=None,
                 width=None, height=None, num_images=None, alpha=None, beta=None, id_scale=None, mix=None,
                 gating=None, activation_maps=None, scheduler=None, clip_skip=None, loras=None, lora_scale=None,
                 negative_embeddings=None, mask_1=None, mask_2=None, mask_3=None, mask_4=None,
                 original_size=None, crops_coords_top_left=None, target_size=None, progress=gr.Progress()):
        people = [
            forms.PersonForm(_paths(r), b or "", e or forms.KEEP, o or forms.KEEP, t or "", (_paths(lm) or [None])[0],
                             (_paths(m) or [None])[0])
            for r, b, e, o, t, lm, m in (
                (refs_1, box_1, expression_1, orientation_1, face_text_1, landmarks_1, mask_1),
                (refs_2, box_2, expression_2, orientation_2, face_text_2, landmarks_2, mask_2),
                (refs_3, box_3, expression_3, orientation_3, face_text_3, landmarks_3, mask_3),
                (refs_4, box_4, expression_4, orientation_4, face_text_4, landmarks_4, mask_4),
            )
        ]
        # None (not sent) takes the page's default, in parse_request
        settings = dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance,
                        width=width, height=height, num_images=num_images, alpha=alpha, beta=beta,
                        id_scale=id_scale, mix=mix, gating=gating, scheduler=scheduler, clip_skip=clip_skip,
                        original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                        target_size=target_size)
        page = {k: v for k, v in d.items() if k != "negative_embeddings"}  # names, resolved below
        try:
            embeddings = service.embeddings.paths(d["negative_embeddings"] if negative_embeddings is None
                                                  else negative_embeddings)
            request = forms.build_request(people, settings, service.upload_root, service.describe, page, embeddings,
                                          identity_branch=service.pipeline.modules.identity_branch)
            choice = forms.lora_choice(loras, lora_scale, service.loras)
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False)
        return run_and_report(request, bool(random_seed), bool(activation_maps), choice, progress)

    def reproduce(sidecar=None, refs_1=None, refs_2=None, refs_3=None, refs_4=None, activation_maps=None,
                  progress=gr.Progress()):
        try:
            if not sidecar:
                raise InputError("no sidecar: upload a .json sidecar written by this app or launch/sample.py")
            data, loras = forms.read_sidecar(_paths(sidecar)[0], service.upload_root)
            request = forms.sidecar_request(data, [_paths(r) for r in (refs_1, refs_2, refs_3, refs_4)],
                                            service.upload_root, service.embeddings)
            for name, _ in loras:
                service.loras.path(name)  # offered here, or the picture would differ
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False)
        return run_and_report(request, False, bool(activation_maps), loras, progress)

    def analyse(person: int):
        def fn(refs):
            crops, lines = [], []
            for path in _paths(refs):
                try:
                    crop, line = service.analyse(path, person)
                    crops.append((previews.png_file(crop, previews_dir), pathlib.Path(path).name))
                    lines.append(line)
                except USER_ERRORS as e:
                    lines.append(str(e))  # "no face found in NAME": said plainly, no zero embedding
            return crops, "\n".join(lines)

        return fn

    def layout(width, height, refs_1, refs_2, refs_3, refs_4, box_1, box_2, box_3, box_4,
               mask_1=None, mask_2=None, mask_3=None, mask_4=None):
        active = [k for k, r in zip(PEOPLE, (refs_1, refs_2, refs_3, refs_4)) if r]
        typed, drawn, problems = {}, {}, []
        for k, text in zip(PEOPLE, (box_1, box_2, box_3, box_4)):
            try:
                typed[k] = parse_box(text or "", f"person {k} box")
            except InputError:
                typed[k] = None
        for k, upload in zip(PEOPLE, (mask_1, mask_2, mask_3, mask_4)):
            path = (_paths(upload) or [None])[0]
            try:
                drawn[k] = masks.read_mask(forms.check_upload(path, service.upload_root)) if path else None
            except (InputError, masks.MaskError) as e:
                drawn[k] = None
                problems.append(f"person {k}: {e}")
        if len(active) == 1 and not typed[active[0]] and drawn[active[0]] is None:
            boxes, note = {}, "one person without a box: no layout control"
        elif active and not any(typed[k] or drawn[k] is not None for k in active):
            boxes = dict(zip(active, default_boxes(len(active)).tolist()))
            note = "default vertical strips"
        else:
            boxes = {k: typed[k] for k in PEOPLE if typed[k] is not None}
            note = "regions: " + ", ".join(f"person {k} {'mask' if drawn[k] is not None else 'box'}"
                                           for k in PEOPLE if typed[k] is not None or drawn[k] is not None)
        canvas = previews.layout_preview([boxes.get(k) for k in PEOPLE], int(height or d["height"]),
                                         int(width or d["width"]), [f"person {k}" for k in PEOPLE],
                                         [drawn[k] for k in PEOPLE])
        return previews.png_file(canvas, previews_dir), "; ".join([note] + problems)

    def draw(who, first, width, height, evt: gr.SelectData):
        """A click on the layout canvas: the first stores a corner, the second (same person)
        writes that person's box field (whose change redraws the canvas)."""
        k = int(str(who).split()[-1])
        point = evt.index  # (x, y) in the canvas' pixels, as gradio's Image reports it
        skip = [gr.skip() for _ in PEOPLE]
        if not point:
            return skip + [first, "click inside the canvas"]
        if not first or first[0] != k:
            return skip + [(k, point), f"person {k}: first corner set; click the opposite corner"]
        box = previews.box_from_corners(first[1], point, int(height or d["height"]), int(width or d["width"]))
        skip[k - 1] = forms.format_box(box)
        return skip + [None, f"person {k}: box drawn"]

    def sketch_on_layout(layout_png):
        """The layout canvas (its picture's aspect ratio) as the brush's background, no strokes."""
        return {"background": layout_png, "layers": [], "composite": None}

    def use_drawing(who, value):
        """The brush drawing becomes the chosen person's mask upload (a PNG in the upload folder,
        so it is checked and read as any upload); its change redraws the layout."""
        k = int(str(who).split()[-1])
        try:
            path = previews.png_file(forms.drawn_mask(value), service.upload_root / "drawn")
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False)
        return [path if j == k else gr.skip() for j in PEOPLE] + [f"person {k}: drawn region set as the mask"]

    def restore(sidecar):
        try:
            data, loras = forms.read_sidecar(_paths(sidecar)[0], service.upload_root)
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False)
        idents = data["identities"]
        values = []
        for k in PEOPLE:
            ident = idents[k - 1] if k <= len(idents) else {}
            values += [forms.format_box(ident.get("box")), forms.KEEP, forms.KEEP, ident.get("face_prompt") or ""]
        # A sidecar without a size or a negative prompt (None: the model's) shows the page's.
        data.update({k: d[k] for k in ("negative_prompt", "width", "height") if data.get(k) is None})
        values += [data["prompt"], data["negative_prompt"], data["seed"], False, data["steps"], data["guidance"],
                   data["width"], data["height"], data["num_images"], str(data["alpha"]), data["beta"],
                   data["id_scale"], "" if data.get("mix") is None else str(data["mix"]), data["gating"],
                   data["scheduler"], data["clip_skip"], [n for n, _ in loras if n in service.loras.names],
                   loras[0][1] if loras else 1.0,
                   [n for n in data.get("negative_embeddings", []) if n in service.embeddings.names]]
        # (to_json leaves out a time id at its default; a field this base model has not is left blank)
        values += [forms.format_box(data.get(name) if name in extra_fields else None) for name in TIME_ID_FIELDS]
        dropped = [name for name in TIME_ID_FIELDS if data.get(name) is not None and name not in extra_fields]
        names = "; ".join(f"person {k}: {', '.join(pathlib.PurePath(r).name for r in i['refs'])}"
                          for k, i in enumerate(idents, start=1))
        message = f"settings restored; references are never read from a sidecar, upload them again ({names})"
        if dropped:
            message += f"; {', '.join(dropped)} left out: this base model has no such setting"
        return values + [message]

    with gr.Blocks(title="DynamicID") as demo:
        gr.Markdown("## DynamicID: several people, each kept from a photo, each face editable")
        if notice:
            gr.Markdown(f"**{notice}**", elem_id="notice")
        person = {}
        identities = service.pipeline.modules.identity_branch  # plain text-to-image: no people to show
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs(visible=identities, elem_id="people"):
                    for k in PEOPLE:
                        with gr.Tab(f"Person {k}", elem_id=f"tab_{k}"):
                            p = person[k] = {}
                            with gr.Row():
                                p["refs"] = gr.File(label=f"person {k}: reference photo(s), several are averaged",
                                                    file_count="multiple", file_types=IMAGE_TYPES, type="filepath",
                                                    elem_id=f"refs_{k}")
                                p["faces"] = gr.Gallery(label="detected face", height=200, columns=3,
                                                        elem_id=f"faces_{k}", interactive=False)
                            p["source"] = gr.Textbox(label="automatic source description", interactive=False,
                                                     lines=1, elem_id=f"source_{k}")
                            p["box"] = gr.Textbox(label="box y_min,x_min,y_max,x_max in [0,1] (blank: strips)",
                                                  elem_id=f"box_{k}")
                            p["mask"] = gr.File(label="or a mask of the region, any shape (white = region, "
                                                "the picture's aspect ratio); leave the box blank",
                                                file_types=IMAGE_TYPES, type="filepath", elem_id=f"mask_{k}")
                            with gr.Row():
                                p["expression"] = gr.Dropdown(list(forms.EXPRESSION_CHOICES), value=forms.KEEP,
                                                              label="expression", elem_id=f"expression_{k}")
                                p["orientation"] = gr.Dropdown(list(forms.ORIENTATION_CHOICES), value=forms.KEEP,
                                                               label="orientation", elem_id=f"orientation_{k}")
                            p["face_text"] = gr.Textbox(label="or a face prompt of your own (overrides the choices)",
                                                        elem_id=f"face_text_{k}")
                            p["landmarks"] = gr.File(label="target landmarks photo (optional)",
                                                     file_types=IMAGE_TYPES, type="filepath",
                                                     elem_id=f"landmarks_{k}")
                prompt = gr.Textbox(label="prompt", value=d["prompt"], elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", value=d["negative_prompt"], elem_id="negative_prompt")
                with gr.Row():
                    seed = gr.Number(label="seed", value=d["seed"], precision=0, elem_id="seed")
                    random_seed = gr.Checkbox(label="random seed", value=False, elem_id="random_seed")
                    steps = gr.Slider(1, 200, value=d["steps"], step=1, label="steps", elem_id="steps")
                    guidance = gr.Number(label="guidance", value=d["guidance"], elem_id="guidance")
                with gr.Row():
                    width = gr.Slider(64, forms.MAX_SIDE, value=d["width"], step=8, label="width", elem_id="width")
                    height = gr.Slider(64, forms.MAX_SIDE, value=d["height"], step=8, label="height", elem_id="height")
                    num_images = gr.Slider(1, forms.MAX_IMAGES, value=d["num_images"], step=1, label="images",
                                           elem_id="num_images")
                with gr.Row(visible=bool(extra_fields)):  # parsed by the flags' parser (`parse_pair`)
                    time_ids = [gr.Textbox(label=f"{name.replace('_', ' ')}, {PAIR_HELP}: {TIME_ID_HELP[name]}",
                                           value=forms.format_box(d[name]), visible=name in extra_fields,
                                           elem_id=name) for name in TIME_ID_FIELDS]
                with gr.Row():
                    alpha = gr.Textbox(label="alpha (layout steps, or a fraction like 0.24)", value=str(d["alpha"]),
                                       elem_id="alpha")
                    beta = gr.Number(label="beta", value=d["beta"], elem_id="beta")
                    id_scale = gr.Number(label="identity scale", value=d["id_scale"], elem_id="id_scale")
                    mix = gr.Textbox(label="mixing m (blank: off)", value="" if d["mix"] is None else str(d["mix"]),
                                     elem_id="mix")
                with gr.Row():
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=d["scheduler"], label="sampler",
                                            elem_id="scheduler")
                    clip_skip = gr.Number(label="clip skip (1 = penultimate layer)", value=d["clip_skip"], precision=0,
                                          minimum=0, elem_id="clip_skip")
                    gating = gr.Checkbox(label="gating", value=d["gating"], elem_id="gating")
                    maps = gr.Checkbox(label="activation maps (compiles once more)", value=False, elem_id="maps")
                with gr.Row():
                    loras = gr.Dropdown(service.loras.names, value=[], multiselect=True, elem_id="loras",
                                        label="style LoRAs (the operator's files, merged in the order picked)")
                    lora_scale = gr.Number(label="LoRA scale", value=1.0, elem_id="lora_scale")
                    embeddings = gr.Dropdown(service.embeddings.names, value=d["negative_embeddings"],
                                             multiselect=True, elem_id="negative_embeddings",
                                             label="negative embeddings (textual inversion)")
            with gr.Column(scale=2):
                layout_view = gr.Image(label="layout", interactive=False, elem_id="layout", type="numpy")
                layout_note = gr.Markdown(elem_id="layout_note")
                draw_for = gr.Radio([f"person {k}" for k in PEOPLE], value="person 1", elem_id="draw_person",
                                    visible=identities,
                                    label="draw a box: choose a person, click two opposite corners on the layout")
                corner = gr.State(None)  # (person, (x, y)) of a first click, per browser session
                with gr.Accordion("draw a region of any shape for the chosen person", open=False, elem_id="sketch_panel",
                                  visible=identities):
                    sketch = gr.ImageEditor(type="numpy", image_mode="RGBA", sources=(), transforms=(), layers=False,
                                            brush=gr.Brush(colors=["#222222"], color_mode="fixed"), elem_id="sketch",
                                            label="paint the region (press 'start' to draw on the layout)")
                    with gr.Row():
                        sketch_start = gr.Button("start on the layout", elem_id="sketch_start")
                        sketch_use = gr.Button("use as the person's mask", elem_id="sketch_use")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", elem_id="cancel")
                status = gr.Textbox(label="status", interactive=False, elem_id="status")
                gallery = gr.Gallery(label="output", columns=2, elem_id="gallery", interactive=False)
                downloads = gr.File(label="downloads: PNG + JSON sidecar", file_count="multiple",
                                    interactive=False, elem_id="downloads")
                maps_view = gr.Gallery(label="activation maps: where each person is injected", columns=4,
                                       elem_id="maps_view", interactive=False)
                sidecar = gr.File(label="drop a sidecar (.json) to restore its settings", file_types=[".json"],
                                  type="filepath", elem_id="sidecar")
                again = gr.Button("Reproduce the sidecar with the photos uploaded above", elem_id="reproduce")

        per_person = [person[k][f] for k in PEOPLE for f in ("refs", "box", "expression", "orientation",
                                                             "face_text", "landmarks")]
        settings = [prompt, negative, seed, random_seed, steps, guidance, width, height, num_images, alpha, beta,
                    id_scale, mix, gating]
        choices = [scheduler, clip_skip, loras, lora_scale, embeddings]  # after `maps`, as generate() takes them
        outputs = [downloads, maps_view, status]
        masks_in = [person[k]["mask"] for k in PEOPLE]  # last, then the time ids: the API's positions stay
        runs = [go.click(generate, per_person + settings + [maps] + choices + masks_in + time_ids, outputs,
                         api_name="generate", concurrency_id="device", concurrency_limit=1),
                again.click(reproduce, [sidecar] + [person[k]["refs"] for k in PEOPLE] + [maps], outputs,
                            api_name="reproduce", concurrency_id="device", concurrency_limit=1)]
        for run in runs:  # the page only: no device, no queue, not in the API
            run.success(gallery_of, downloads, gallery, api_visibility="private", queue=False)
        stop.click(service.cancel, None, None, queue=False, api_name="cancel")
        restored = [person[k][f] for k in PEOPLE for f in ("box", "expression", "orientation", "face_text")]
        restored += [c for c in settings] + choices + time_ids + [status]
        sidecar.upload(restore, sidecar, restored, api_name="restore")
        for k in PEOPLE:
            person[k]["refs"].change(analyse(k), person[k]["refs"], [person[k]["faces"], person[k]["source"]],
                                     api_name=f"analyse_{k}", concurrency_limit=4)
        layout_inputs = [width, height] + [person[k]["refs"] for k in PEOPLE] + [person[k]["box"] for k in PEOPLE]
        layout_inputs += masks_in
        for component in layout_inputs:
            component.change(layout, layout_inputs, [layout_view, layout_note], api_visibility="private", queue=False)
        layout_view.select(draw, [draw_for, corner, width, height], [person[k]["box"] for k in PEOPLE]
                           + [corner, layout_note], api_visibility="private", queue=False)
        sketch_start.click(sketch_on_layout, layout_view, sketch, api_visibility="private", queue=False)
        sketch_use.click(use_drawing, [draw_for, sketch], masks_in + [layout_note], api_visibility="private",
                         queue=False)
        demo.load(layout, layout_inputs, [layout_view, layout_note], api_visibility="private", queue=False)
    return demo


def launch(demo: gr.Blocks, service: AppService, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True, keep_files_s: float = KEEP_FILES_MINUTES * 60):
    """Serve with one generation at a time (others queue, their position shown), uploads of at
    most forms.MAX_UPLOAD_BYTES, and only the output folder servable besides gradio's own.
    keep_files_s: files in gradio's cache (uploads, served copies) older than this are deleted,
    checked every min(keep_files_s, 10 min); all of them when the server stops. The pictures
    and sidecars under the service's output folder are the app's product and stay."""
    age = max(1, round(keep_files_s))
    demo.delete_cache = (min(age, 600), age)  # gradio reads it when the server starts
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name=host, server_port=port, share=share, max_file_size=forms.MAX_UPLOAD_BYTES,
        allowed_paths=[str(service.out_dir)], prevent_thread_lock=not block, show_error=True, quiet=not block,
    )
