# Pinned copy of mmsegmentation 1.2.2 configs/_base_/default_runtime.py.
# Why not `_base_ = 'mmseg::_base_/default_runtime.py'`: mmengine 0.10.7
# finds an installed package's configs with pkg_resources, which the
# setuptools of the project's venv (84; torch 2.14 asks for >= 77) no
# longer ships, so the scoped base fails to load (ModuleNotFoundError).
# (unchanged below this line)
default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False

tta_model = dict(type='SegTTAModel')
