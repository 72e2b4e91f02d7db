# Pinned copy of mmdet 3.3.0 configs/_base_/default_runtime.py.
# Why not `_base_ = 'mmdet::_base_/default_runtime.py'`: mmengine 0.10.7
# finds an installed package's configs with pkg_resources, which the
# setuptools of the project's venv (84; torch 2.14 asks for >= 77) no
# longer ships, so the scoped base fails to load (ModuleNotFoundError).
# (unchanged below this line)
default_scope = 'mmdet'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'))

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)

log_level = 'INFO'
load_from = None
resume = False
