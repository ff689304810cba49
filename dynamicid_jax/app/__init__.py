"""The DynamicID web app (gradio): `python launch/app.py --demo`.

catalog.py  the operator's style LoRAs and negative embeddings, offered by file name
forms.py    form values and sidecars -> checked SampleRequests (uploads only, no server paths)
previews.py face crops, the layout canvas, activation overlays (pictures only)
service.py  AppService: the one DynamicIDPipeline, one run at a time through the generation
            engine, merged LoRA choices, outputs, cancel, compile log
ui.py       the gradio page and its named API endpoints (/generate, /reproduce, /restore, ...)
"""
