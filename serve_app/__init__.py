"""lance-serve's Ray Serve application: an OpenAI-compatible ingress over the thinker and DiT stages.

Path of a request: ingress.py (routes) -> request_parsing.py + knobs.py (OpenAI body -> ImageRequest /
TextRequest, every check a 400) -> pipeline.py (thinker.prefill_context -> dit.generate_image, or
thinker.generate_text) -> openai_protocol.py (response objects). builder.py builds the application
from a stage graph (stage_graph.py: the schema and every deployment's Serve options) and its args
(app_config.py), and picks the model (model_choice.py); errors.py shapes every failure as an OpenAI
error body; metrics.py records the requests and the stage calls (the names: stages/metrics.py).
stage_graph.py, app_config.py and strict_model.py are pure (pydantic, PyYAML): the deploy tooling
imports them without torch or Ray Serve.
"""
