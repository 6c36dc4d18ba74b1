"""Which served checkpoint variant does a task: one endpoint for Lance_3B and Lance_3B_Video.

A stage graph serves one or both variants, each with its own thinker and DiT deployments. Image tasks
go to Lance_3B when it is served, video tasks to Lance_3B_Video; a graph with only Lance_3B_Video
serves every task (upstream runs the image tasks on the video checkpoint too). A task that no served
variant can do is a 400 that names graphs that serve it.
"""
from __future__ import annotations

from .errors import bad_request

IMAGE_VARIANT = "Lance_3B"
VIDEO_VARIANT = "Lance_3B_Video"
VARIANTS = (IMAGE_VARIANT, VIDEO_VARIANT)
VIDEO_TASKS = frozenset({"t2v", "i2v", "video_edit", "x2t_video"})
# shipped graphs that serve the video checkpoint (configs/stage_graphs/)
VIDEO_GRAPHS = ("cpu", "single_gpu_video", "multi_gpu_video")


def variant_for_task(task: str, served: tuple[str, ...], graph: str = "",
                     param: str | None = "modalities") -> str:
    if task in VIDEO_TASKS:
        if VIDEO_VARIANT in served:
            return VIDEO_VARIANT
        where = f" (stage graph {graph!r})" if graph else ""
        raise bad_request(f"{task} needs the {VIDEO_VARIANT} checkpoint, which this deployment"
                          f"{where} does not serve: deploy a stage graph that serves it (stage_graph:"
                          f" {' / '.join(VIDEO_GRAPHS)})", param=param,
                          code="task_not_served")
    return IMAGE_VARIANT if IMAGE_VARIANT in served else served[0]
