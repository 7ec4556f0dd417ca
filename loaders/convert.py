"""The paper's own pre-trained policies and datasets: import the reference implementation's checkpoints.

The reference implementation (`irom-princeton/dppo`) publishes, for every task of the paper, its
pre-trained checkpoints, its preprocessed datasets (`train.npz`) and their normalisation statistics
(`normalization.npz`), on public Google Drive (its `script/download_url.py`). Its pre-training agent saves
`{"epoch": int, "model": state_dict, "ema": state_dict}` (`agent/pretrain/train_agent.py`,
`PreTrainAgent.save_model`) with the policy network under `network.`. This module turns such a file,
with the task's `normalization.npz`, into this project's self-describing checkpoint:

    python -m loaders.convert state_8000.pt --env-id square [--normalization normalization.npz] [--output square.pt]

and every fine-tuning script accepts the reference file directly as `--checkpoint` (converted in memory),
or `--checkpoint paper` for the published checkpoint of the task (downloaded to
`<DPPO_DATA_DIR or data>/<task>/paper/` once).

What is converted: diffusion policies with the MLP (`model/diffusion/mlp_diffusion.py`, `DiffusionMLP`) or
UNet (`model/diffusion/unet.py`, `Unet1D`) network, and Gaussian MLP policies (`model/common/mlp_gaussian.py`,
`Gaussian_MLP`). The network's sizes (widths, residual blocks, LayerNorm, observation MLP, time
embedding, T_a, T_o) are read from the weights; what the weights cannot tell (K, the activation, the UNet's
GroupNorm groups and epsilon, the Gaussian's fixed std) comes from the reference's pre-training config of
that task (`cfg/<suite>/pretrain/<task>/pre_<kind>.yaml`, transcribed in `REFERENCE_CONFIGS`) and is
printed. GMM and Transformer policies and the pixel (ViT) policies are refused in one line: their
networks here are not the reference's. See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from typing import Any, NoReturn

import torch

from common.errors import DatasetError, TaskError
from common.networks import ChunkMLP, DiffusionMLP
from common.unet import UNet1D
from common.normalizer import Normalizer
from common.runs import (CHECKPOINT_FORMAT, POSITIVE, check_output_path, check_policy_numbers, is_reference_checkpoint,
                         save_checkpoint)
from common.tasks import Task, get_task
from loaders.files import REPO_ROOT, download, read_normalization

REFERENCE = "irom-princeton/dppo"
DRIVE_FILE = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"
DRIVE_FOLDER = "https://drive.google.com/drive/folders/{}"

# ---- what the reference publishes (script/download_url.py), per task of this project ----
# dataset: Drive folder holding train.npz + normalization.npz; normalization: the file alone;
# checkpoints: kind -> (the reference's run path, Drive file id). The kinds DPPO fine-tunes by default are
# `diffusion_mlp` (cfg/<suite>/finetune/<task>/ft_ppo_diffusion_mlp.yaml's base_policy_path).
_ROBOMIMIC = {
    "lift": ("1lbXgMKBTAiFdJqPZqWXpwjEyrVW16MBu", "1d3WjwRds-7I5bBFpZuY27OT9ycb8r_QM", {
        "diffusion_mlp": ("lift_pre_diffusion_mlp_ta4_td20/2024-06-28_14-47-58/checkpoint/state_5000.pt",
                          "1Ngr-DNxoB9XNCZ2O-NF5p60NzmYlzmWG"),
        "diffusion_unet": ("lift_pre_diffusion_unet_ta4_td20/2024-06-29_02-49-45/checkpoint/state_8000.pt",
                           "1T-NGgBmT-UmcVWADygXj873IyWLewvsU"),
        "gaussian_mlp": ("lift_pre_gaussian_mlp_ta4/2024-06-28_14-48-24/checkpoint/state_5000.pt",
                         "157x5_XJy3ZyaPz_7Vr_opXAZ_mPvlmhp")}),
    "can": ("1J1qSvsDEf40jnMZY9W0r6ww--E3MdmK3", "14FxHk9zQ-5ulAO26a6xrdvc-gRkL36FR", {
        "diffusion_mlp": ("can_pre_diffusion_mlp_ta4_td20/2024-06-28_13-29-54/checkpoint/state_5000.pt",
                          "1L1ZLD1u1Y1YJmRLGzScXbQ02wGS-_cWo"),
        "diffusion_unet": ("can_pre_diffusion_unet_ta4_td20/2024-06-29_02-49-45/checkpoint/state_8000.pt",
                           "1s346KCe2aar_tXX7u8rzjRF3kpwVpH5c"),
        "gaussian_mlp": ("can_pre_gaussian_mlp_ta4/2024-06-28_13-31-00/checkpoint/state_5000.pt",
                         "1bA-A0p0KnHwrVO3MqjuYdV3dZuuZICMy")}),
    "square": ("1mVVNOJ6wt2EXoapF7PKkcqxbsB9gvK-B", "1FFMqWVv0145OJjbA_iglkWywmdK22Za-", {
        "diffusion_mlp": ("square_pre_diffusion_mlp_ta4_td20/2024-07-10_01-46-16/checkpoint/state_8000.pt",
                          "1lP9mNe2AxMigfOywcaHOOR7FxQ-KR_Ee"),
        "diffusion_unet": ("square_pre_diffusion_unet_ta4_td20/2024-06-29_02-48-45/checkpoint/state_8000.pt",
                           "11IEgQe0LFI23hn1Cwf6Z_YfJdDilVc0z"),
        "gaussian_mlp": ("square_pre_gaussian_mlp_ta4/2024-06-28_15-02-32/checkpoint/state_5000.pt",
                         "1rETiyXLz7YgYoHKwLEZa7dFabu4gfJR8")}),
    "transport": ("1EVHmFx-YdX4MEE1EjwduVayvaH9vvqvK", "1EmC80gIgLoqQ8kRPH5r0mDVqX6NqHO3p", {
        "diffusion_mlp": ("transport_pre_diffusion_mlp_ta8_td20/2024-07-08_11-18-59/checkpoint/state_8000.pt",
                          "1240FmcDPg_VyXReEtePjBN4MML-OT21C"),
        "diffusion_unet": ("transport_pre_diffusion_unet_ta16_td20/2024-07-04_02-20-53/checkpoint/state_8000.pt",
                           "1MNGT8j9x1uudugGUcia-xwP_7f7xVY4K"),
        "gaussian_mlp": ("transport_pre_gaussian_mlp_ta8/2024-07-10_01-50-52/checkpoint/state_5000.pt",
                         "1NOHDNHu1sTabxBd4DZrSrTyX9l1I2GuO")}),
}
_GYM = {
    "hopper": ("18Ti-92XVq3sE24K096WAxjC_SCCngeHd", "1HHZ2X6r5io6hjG-MHVFFoPMJV2fJ3lis", {
        "diffusion_mlp": ("hopper-medium-v2_pre_diffusion_mlp_ta4_td20/2024-06-12_23-10-05/checkpoint/state_3000.pt",
                          "1uV3beg2YuBRh11t7jnRsyd_M9bsFGOkA")}),
    "walker2d": ("1BJu8NklriunDHsDrLT6fEpcro3_2IPFf", "1NSX7t3DFKaBj5HNpv91Oo5h6oXTk0zoo", {
        "diffusion_mlp": ("walker2d-medium-v2_pre_diffusion_mlp_ta4_td20/2024-06-12_23-06-12/checkpoint/state_3000.pt",
                          "1StopetttozWba4l9u0VT_JW1rYe6kJx2")}),
    "halfcheetah": ("1Drel26tiuQ9oD3YNf1eyy0UVaf5SQj-U", "1LlwCMfy1b5e8jSx99CV3lWhcrQWrI2Jm", {
        "diffusion_mlp": ("halfcheetah-medium-v2_pre_diffusion_mlp_ta4_td20/2024-06-12_23-04-42/checkpoint/state_3000.pt",
                          "1o9ryyeZQAsaB4ffUTCJkIaGCi0frL3G4")}),
}
_KITCHEN = {  # D4RL's 60-dim observation: the layout of sims/kitchen.py (docs/deviations.md "Franka Kitchen")
    f"kitchen-{name}": (folder, norm, {"diffusion_mlp": (f"kitchen-{name}-v0_pre_diffusion_mlp_ta4_td20/{run}/checkpoint/"
                                                        "state_8000.pt", ckpt)})
    for name, folder, norm, run, ckpt in (
        ("complete", "18aqg7KIv-YNXohTsRR7Zmg-RyDtdhkLc", "1tBATWLoP1E5s08vr5fiUZBzn8EEsjEZh", "2024-10-20_16-47-42_42",
         "1YBwyNd30a4_inu2sZzNSNLJQsj8fN3ZX"),
        ("partial", "1zLOx1q4FbJK1ZWLui_vhM2x1fMEkBC2D", "1Ptt0cwQwmb5_HGNM-zggRaDKfkqqNO5e", "2024-10-20_16-48-29_42",
         "1oSupKkUjCFQVWBIJV5Seh-CclWhgpopS"),
        ("mixed", "1HRMM16UC10A00oBqjYOL1E8hS5icwtvo", "11gj846QTYFPeV14nhcL5Z9OA5RHIGVt1", "2024-10-20_16-48-28_42",
         "1X24Hqbn4b4xyLK_1A3D6zhSgsN7frVCG"))}
_AVOID = {  # the reference's modes d56_r12 / d57_r12 / d58_r12 are M1 / M2 / M3
    "avoid-m1": ("1ZAPvLQwv2y4Q98UDVKXFT4fvGF5yhD_o", "1PubKaPabbiSdWYpGmouDhYfXp4QwNHFG", {
        "diffusion_mlp": ("avoid_d56_r12_pre_diffusion_mlp_ta4_td20/2024-07-06_22-50-07/checkpoint/state_10000.pt",
                          "1JdEOG0KsCA9EX9zq09DE0xkTB4xy6DNp"),
        "gaussian_mlp": ("avoid_d56_r12_pre_gaussian_mlp_ta4/2024-07-07_01-35-48/checkpoint/state_10000.pt",
                         "138wEi_rVV5HpcwgH6_3BlXQ1dhgZN05L")}),
    "avoid-m2": ("1wyJi1Zbnd6JNy4WGszHBH40A0bbl-vkd", "1Hoohw8buhsLzXoqivMA6IzKS5Izlj07_", {
        "diffusion_mlp": ("avoid_d57_r12_pre_diffusion_mlp_ta4_td20/2024-07-07_13-12-09/checkpoint/state_15000.pt",
                          "1wAmRHzRZ4O5z_ZWDhVg5JFZbugo4cHKA"),
        "gaussian_mlp": ("avoid_d57_r12_pre_gaussian_mlp_ta4/2024-07-07_02-15-50/checkpoint/state_10000.pt",
                         "1hf_647bJ0EMRhArsfxStSkhgkGaWGhmD")}),
    "avoid-m3": ("1mNXCIPnCO_FDBlEj95InA9eWJM2XcEEj", "1qt7apV52C9Tflsc-A55J6uDMHzaFa1wN", {
        "diffusion_mlp": ("avoid_d58_r12_pre_diffusion_mlp_ta4_td20/2024-07-07_13-54-54/checkpoint/state_15000.pt",
                          "1w5X1lJZd0wI6E2XRdj839TqJ_9EziGRx"),
        "gaussian_mlp": ("avoid_d58_r12_pre_gaussian_mlp_ta4/2024-07-07_13-11-49/checkpoint/state_10000.pt",
                         "1YIVEN0Ykica9dj_DxxPrB4QJLgv-Ne0N")}),
}
_FURNITURE = {
    "one-leg-low": ("1v4LG2D1fS8id5hqE7Jjt7MYNFUEBNyh4", "1fbYxau8Z0tifeuu_06UKdRRz8zozxMUE", {
        "diffusion_mlp": ("one_leg_low_dim_pre_diffusion_mlp_ta8_td100/2024-07-22_20-01-16/checkpoint/state_8000.pt",
                          "1tP0i53EMwNyw_bS2lt9WtQDIAoTxn40g"),
        "diffusion_unet": ("one_leg_low_dim_pre_diffusion_unet_ta16_td100/2024-07-03_22-23-38/checkpoint/state_8000.pt",
                           "13nOr7EI79RqdRuoc-je0LoTX5Y-IaO9J"),
        "gaussian_mlp": ("one_leg_low_dim_pre_gaussian_mlp_ta8/2024-06-26_23-43-02/checkpoint/state_3000.pt",
                         "1DeHj-IEX3a2ZLXFlV0MYe1N_5qupod_w")}),
    "one-leg-med": ("1ohDuMSgCqGN1CSh1cI_8A0ia3DVHzj3w", "1bT-MIG99-uwSXL3VwCz6kK9Kg9t6a7BZ", {
        "diffusion_mlp": ("one_leg_med_dim_pre_diffusion_mlp_ta8_td100/2024-07-23_01-28-11/checkpoint/state_8000.pt",
                          "1aEzObl4EkOBKSs0wI2MGmkslzIjZy2_L"),
        "diffusion_unet": ("one_leg_med_dim_pre_diffusion_unet_ta16_td100/2024-07-04_02-16-16/checkpoint/state_8000.pt",
                           "1pSwp_IUDSQ15OszChCkrrTQYdvG3pHc1"),
        "gaussian_mlp": ("one_leg_med_dim_pre_gaussian_mlp_ta8/2024-06-28_16-27-02/checkpoint/state_3000.pt",
                         "1lC4PKRPn4tRWR9VW5fSfCu3MKnRvYqD6")}),
    "lamp-low": ("14MqDUmuNmTFcBtKw5gcvx7nuir0zmF7V", "1KRyCcCT63-cikz6Q_McXM0iVYx9M2E_o", {
        "diffusion_mlp": ("lamp_low_dim_pre_diffusion_mlp_ta8_td100/2024-07-23_01-28-20/checkpoint/state_8000.pt",
                          "1md5m4vpe5MmStu-fOk8snF-52BYGZpSc"),
        "diffusion_unet": ("lamp_low_dim_pre_diffusion_unet_ta16_td100/2024-07-04_02-16-48/checkpoint/state_8000.pt",
                           "103lUuvyKPvp97hzBYnUDAWgor6LsUf21"),
        "gaussian_mlp": ("lamp_low_dim_pre_gaussian_mlp_ta8/2024-06-28_16-26-51/checkpoint/state_3000.pt",
                         "1tK6NuZf4_xtTlZksIR9oQxiFEADFRVA9")}),
    "lamp-med": ("1bhOoN0xet4ga0rOIvcRHUFoaCjPRNRLf", "1WBHKbA6BtSfF3qfRIkyuWga5T9X3fEvg", {
        "diffusion_mlp": ("lamp_med_dim_pre_diffusion_mlp_ta8_td100/2024-07-23_01-28-20/checkpoint/state_8000.pt",
                          "1yVUXYCK_vFhQ7mawxnCGxuHS6RgWWDjj"),
        "diffusion_unet": ("lamp_med_dim_pre_diffusion_unet_ta16_td100/2024-07-04_02-17-21/checkpoint/state_8000.pt",
                           "1_qd47U50on-T1Pqojlfy7S3Cl6bLm_D1"),
        "gaussian_mlp": ("lamp_med_dim_pre_gaussian_mlp_ta8/2024-06-28_16-26-56/checkpoint/state_3000.pt",
                         "1d16HmHgidtXForqoN5QJg_e152XCaJM5")}),
    "round-table-low": ("15oF3qiqGzlT_98FDoTIVtGmLtHd5SIbi", "1CwfNLI5KXEkl_jVgtAY7-xfq7jED-xc0", {
        "diffusion_mlp": ("round_table_low_dim_pre_diffusion_mlp_ta8_td100/2024-07-23_01-28-26/checkpoint/state_8000.pt",
                          "1iJyqJr84AtszGqPeSysN70A-SmP73mKu"),
        "diffusion_unet": ("round_table_low_dim_pre_diffusion_unet_ta16_td100/2024-07-04_02-19-48/checkpoint/state_8000.pt",
                           "1F3RFgLcFemU-IDUrLCXMzmQXknC2ISgJ"),
        "gaussian_mlp": ("round_table_low_dim_pre_gaussian_mlp_ta8/2024-06-28_16-26-51/checkpoint/state_3000.pt",
                         "1eX2u0cvu_zveblrg2htFomAxSToJmHyL")}),
    "round-table-med": ("1U27xjdRrKlLC8E33o7jMFZ1HF5P_Soik", "1vNxzok6f6HROGxQR2eoThsN62hVjpayn", {
        "diffusion_mlp": ("round_table_med_dim_pre_diffusion_mlp_ta8_td100/2024-07-23_01-28-29/checkpoint/state_8000.pt",
                          "1DDvHEqb7WqVgT3_W6gYCNDQrvGyreatP"),
        "diffusion_unet": ("round_table_med_dim_pre_diffusion_unet_ta16_td100/2024-07-04_02-20-21/checkpoint/state_8000.pt",
                           "1hzungyvt3Uc-XbrCzVghzdr59zDf6FlD"),
        "gaussian_mlp": ("round_table_med_dim_pre_gaussian_mlp_ta8/2024-06-28_16-26-38/checkpoint/state_3000.pt",
                         "1LvELZ7A-whxKk1Oq7S8M9uBiSrWPAGQT")}),
}
PAPER_FILES: dict[str, tuple[str, str, dict[str, tuple[str, str | None]]]] = {
    **_GYM, **_ROBOMIMIC, **_AVOID, **_FURNITURE, **_KITCHEN}
# the 96x96 pixel variants (train.npz with `images`, their normalisation) of the robomimic tasks
PAPER_PIXEL_FILES = {"lift": ("1H-UncdzHx6wd5NWVzrQyftfGls7KGz1O", "15GnKDIK8VasvUHahcvEeK_uEs1J9i0ja"),
                     "can": ("1VGp_5xXXb1-GJutdSc6AZSzXNk-6_vRz", "1APAB6W10ECaNVVL72F0C2wC6oJhhbjWX"),
                     "square": ("1-aGqVeKLIzJCEst8p0ZTjfjkrXFfJLxa", "1jq5atfHdu-ZMQ8YaFjwcctbJESBYDgP8"),
                     "transport": ("1cOkAZQmmETYEPFrnnX0EuD6mv0kUfMO2", "1LBgvIacNzbXCZXWKYanddqiotevG3hmA")}

# ---- what the weights do not tell: the reference's pre-training configs (cfg/<suite>/pretrain/<task>/pre_<kind>.yaml) ----
# diffusion: K (`denoising_steps`), `activation_type` (the DiffusionMLP default is Mish); UNet: also n_groups,
# groupnorm_eps and T_a (a convolution's weights do not fix the chunk length); Gaussian: activation, fixed_std.
REFERENCE_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("gym", "diffusion_mlp"): dict(denoising_steps=20, activation="relu"),
    ("avoid", "diffusion_mlp"): dict(denoising_steps=20, activation="relu"),
    ("kitchen", "diffusion_mlp"): dict(denoising_steps=20, activation="mish"),
    ("robomimic", "diffusion_mlp"): dict(denoising_steps=20, activation="mish"),
    ("furniture", "diffusion_mlp"): dict(denoising_steps=100, activation="mish"),
    ("robomimic", "diffusion_unet"): dict(denoising_steps=20, activation="mish", n_groups=8, groupnorm_eps=1e-5,
                                          horizon_steps=4),
    ("furniture", "diffusion_unet"): dict(denoising_steps=100, activation="mish", n_groups=8, groupnorm_eps=1e-5,
                                          horizon_steps=16),
    ("robomimic", "gaussian_mlp"): dict(activation="mish", fixed_std=0.1),
    ("avoid", "gaussian_mlp"): dict(activation="relu", fixed_std=0.1),
    ("furniture", "gaussian_mlp"): dict(activation="relu", fixed_std=0.1),
    ("gym", "gaussian_mlp"): dict(activation="mish", fixed_std=0.1),
}
TASK_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {  # per-task exceptions to the suite's values
    ("transport", "diffusion_unet"): dict(horizon_steps=16),
    ("one-leg-low", "diffusion_unet"): dict(groupnorm_eps=1e-4),
    ("lamp-low", "diffusion_unet"): dict(groupnorm_eps=1e-4),
}


# the reference's class of each kind of network (in messages)
REFERENCE_NETWORKS = {"diffusion_mlp": "DiffusionMLP", "diffusion_unet": "Unet1D", "gaussian_mlp": "Gaussian_MLP"}


class ConversionError(DatasetError):
    """A reference checkpoint that cannot become a checkpoint of this project (one line naming why)."""


def config_path(task: Task, kind: str) -> str:
    """Where the reference keeps the pre-training config of `task` and `kind` (for messages)."""
    folder = {"gym": f"{task.id}-medium-v2", "kitchen": f"{task.id}-v0"}.get(task.suite, task.id.replace("-", "_"))
    suite = {"avoid": "d3il", "kitchen": "gym"}.get(task.suite, task.suite)
    return f"cfg/{suite}/pretrain/{folder}/pre_{kind}.yaml"


def reference_config(task: Task, kind: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings of the reference's pre-training config of `task` that the weights do not hold."""
    if (task.suite, kind) not in REFERENCE_CONFIGS:
        raise ConversionError(f"{REFERENCE} publishes no {kind.replace('_', ' ')} pre-training config for {task.suite} "
                              f"tasks; pass the settings explicitly (python -m loaders.convert --help)")
    cfg = {**REFERENCE_CONFIGS[(task.suite, kind)], **TASK_CONFIGS.get((task.id, kind), {})}
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None and k != "weights"})
    return cfg


# ---- reading a reference checkpoint ----

REINFLOW_HINT = ("its network may be a flow policy (ReFlow), whose tensors carry a diffusion MLP's names, so it is not "
                 "imported; pre-train a flow policy here with python flow_pretrain.py and fine-tune it with python "
                 "reinflow.py")


def is_reinflow_checkpoint(ckpt: Any) -> bool:
    """Checkpoints saved by ReinFlow's code (github ReinFlow/ReinFlow): its pre-training saves `optimizer` and
    `lr_scheduler` beside `model`/`ema` (the DPPO reference saves only `epoch`, `model`, `ema`:
    agent/pretrain/train_agent.py), its fine-tuning `actor_ft.policy.*` weights or a `policy` dict with
    `cnt_train_steps` (agent/finetune/reinflow/train_ppo_flow_agent.py, save_model). A ReFlow's `network.*` names are
    those of a DiffusionMLP, so only the keys beside them tell ReinFlow's files apart; its diffusion pre-training
    files look the same as its flow ones and are refused with them."""
    if not isinstance(ckpt, dict):
        return False
    model = ckpt.get("model") if isinstance(ckpt.get("model"), dict) else {}
    return (("lr_scheduler" in ckpt or "optimizer" in ckpt) and "network.time_embedding.1.weight" in model
            or any(isinstance(k, str) and k.startswith("actor_ft.policy.") for k in model)
            or (isinstance(ckpt.get("policy"), dict) and "cnt_train_steps" in ckpt))


def detect_kind(sd: dict[str, torch.Tensor], ckpt: dict[str, Any] | None = None) -> str:
    """`diffusion_mlp`, `diffusion_unet` or `gaussian_mlp` from the module names (and, for a ReinFlow checkpoint, the
    whole checkpoint `ckpt`); the rest is refused in one line."""
    if is_reinflow_checkpoint(ckpt):
        raise ConversionError(f"this checkpoint was saved by ReinFlow's code: {REINFLOW_HINT}")
    keys = list(sd)
    if any(k.startswith(("actor_ft.", "critic.", "actor.")) for k in keys):
        raise ConversionError("this is a reference fine-tuning checkpoint (actor_ft/critic); only the reference's "
                              "pre-training checkpoints (state_<epoch>.pt with model and ema) are imported")
    if any(k.startswith(("network.backbone.", "network.compress")) for k in keys):
        raise ConversionError("this is a reference pixel (ViT) policy; pixel policies are not imported yet "
                              "(they need the ViT encoder of dppo_finetune_pixel.py)")
    if any(k.startswith("network.mlp_weights.") or k.startswith("network.modes_head") for k in keys):
        raise ConversionError("this is a reference GMM policy; its network (a separate MLP for the mode weights) is not "
                              "this project's GMM network: pre-train one here with python gmm_ppo.py --pretrain")
    if any(k.startswith("network.transformer.") for k in keys):
        raise ConversionError("this is a reference Transformer policy; its GPT network is not this project's "
                              "ChunkTransformer: pre-train one here with "
                              "python gaussian_ppo.py --pretrain --backbone transformer")
    if "network.time_embedding.1.weight" in sd:
        return "diffusion_mlp"
    if "network.time_mlp.1.weight" in sd:
        return "diffusion_unet"
    if "network.logvar_min" in sd and any(k.startswith("network.mlp_mean.") for k in keys):
        if any(k.startswith("network.mlp_logvar.") for k in keys):
            raise ConversionError("this reference Gaussian policy learns its std with a network head (fixed_std: null); "
                                  "only the published fixed-std Gaussian policies are imported")
        return "gaussian_mlp"
    raise ConversionError(f"unknown reference network (first keys: {', '.join(keys[:3])}); expected a DiffusionMLP, "
                          "Unet1D or Gaussian_MLP pre-training checkpoint")


def _network(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `network.` tensors, prefix removed, in the saved order (learned tensors only)."""
    return {k[len("network."):]: v for k, v in sd.items() if k.startswith("network.")}


def _linears(sd: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    """The 2-D weights under `prefix`, in order (one per nn.Linear)."""
    return [v for k, v in sd.items() if k.startswith(prefix) and k.endswith("weight") and v.dim() == 2]


def _mlp_shape(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """in/hidden/out widths, residual blocks and LayerNorm of a reference MLP or ResidualMLP stored under `prefix`."""
    residual = any(re.match(re.escape(prefix) + r"layers\.\d+\.l1\.", k) for k in sd)
    if residual:
        first, last = sd[prefix + "layers.0.weight"], _linears(sd, prefix)[-1]
        n_blocks = sum(bool(re.fullmatch(re.escape(prefix) + r"layers\.\d+\.l1\.weight", k)) for k in sd)
        return dict(in_dim=first.shape[1], hidden=[first.shape[0]] * (2 * n_blocks + 1), out_dim=last.shape[0],
                    residual=True, use_layernorm=any(k.startswith(prefix) and ".norm1." in k for k in sd))
    weights = _linears(sd, prefix)
    if any(k.startswith(prefix) and ".norm_" in k for k in sd):
        raise ConversionError(f"the reference network's {prefix.rstrip('.')} is a plain MLP with LayerNorm, which this "
                              "project's networks do not have")
    return dict(in_dim=weights[0].shape[1], hidden=[w.shape[0] for w in weights[:-1]], out_dim=weights[-1].shape[0],
                residual=False, use_layernorm=False)


def _split_cond(task: Task, cond_dim: int, where: str) -> int:
    if cond_dim % task.obs_dim:
        raise ConversionError(f"the checkpoint's observation input is {cond_dim} wide ({where}), not a multiple of "
                              f"{task.id}'s observation size {task.obs_dim}: is it a checkpoint of another task?")
    return cond_dim // task.obs_dim


def _chunk(task: Task, out_dim: int, where: str) -> int:
    if out_dim % task.action_dim:
        raise ConversionError(f"the checkpoint predicts {out_dim} numbers per chunk ({where}), not a multiple of "
                              f"{task.id}'s action size {task.action_dim}: is it a checkpoint of another task?")
    return out_dim // task.action_dim


def diffusion_mlp_arch(sd: dict[str, torch.Tensor], task: Task, cfg: dict[str, Any]) -> dict[str, Any]:
    """`common.networks.DiffusionMLP` arguments of a reference `DiffusionMLP` (network tensors, prefix removed)."""
    time_dim = sd["time_embedding.1.weight"].shape[1]
    trunk = _mlp_shape(sd, "mlp_mean.")
    horizon = _chunk(task, trunk["out_dim"], "mlp_mean")
    if any(k.startswith("cond_mlp.") for k in sd):
        cond = _mlp_shape(sd, "cond_mlp.")
        cond_mlp_dims, cond_in = [*cond["hidden"], cond["out_dim"]], cond["in_dim"]
    else:
        cond_mlp_dims, cond_in = None, trunk["in_dim"] - time_dim - trunk["out_dim"]
    return dict(action_dim=task.action_dim, horizon_steps=horizon, obs_dim=task.obs_dim,
                cond_steps=_split_cond(task, cond_in, "cond_mlp" if cond_mlp_dims else "mlp_mean"),
                mlp_dims=trunk["hidden"], cond_mlp_dims=cond_mlp_dims, activation=cfg["activation"],
                residual=trunk["residual"], time_dim=time_dim, use_layernorm=trunk["use_layernorm"])


def diffusion_unet_arch(sd: dict[str, torch.Tensor], task: Task, cfg: dict[str, Any]) -> dict[str, Any]:
    """`common.unet.UNet1D` arguments of a reference `Unet1D` (network tensors, prefix removed)."""
    if any(k.startswith("cond_mlp.") for k in sd):
        raise ConversionError("this reference Unet1D has an observation MLP (cond_mlp_dims), which no published config "
                              "uses and this project's UNet1D does not have")
    time_dim = sd["time_mlp.1.weight"].shape[1]
    down = sorted({int(k.split(".")[1]) for k in sd if k.startswith("down_modules.")})
    chans = [sd[f"down_modules.{i}.0.blocks.0.block.0.weight"].shape[0] for i in down]
    first = sd["down_modules.0.0.blocks.0.block.0.weight"]
    large = "down_modules.0.0.cond_encoder.4.weight" in sd
    film = sd[f"down_modules.0.0.cond_encoder.{0 if large else 1}.weight"]
    if any(c % chans[0] for c in chans):
        raise ConversionError(f"the reference Unet1D's channels {chans} are not multiples of its first level's")
    return dict(action_dim=first.shape[1], cond_dim=film.shape[1] - time_dim, dim=chans[0],
                dim_mults=[c // chans[0] for c in chans], kernel_size=first.shape[2], n_groups=cfg["n_groups"],
                time_dim=time_dim, cond_predict_scale=film.shape[0] == 2 * chans[0], large_cond_encoder=large,
                groupnorm_eps=cfg["groupnorm_eps"], activation=cfg["activation"])


def gaussian_mlp_arch(sd: dict[str, torch.Tensor], task: Task, cfg: dict[str, Any]) -> dict[str, Any]:
    """`common.networks.ChunkMLP` arguments of a reference fixed-std `Gaussian_MLP` (network tensors, prefix removed)."""
    trunk = _mlp_shape(sd, "mlp_mean.")
    return dict(obs_dim=task.obs_dim, horizon_steps=_chunk(task, trunk["out_dim"], "mlp_mean"), out_dim=task.action_dim,
                cond_steps=_split_cond(task, trunk["in_dim"], "mlp_mean"), mlp_dims=trunk["hidden"],
                activation=cfg["activation"], residual=trunk["residual"], use_layernorm=trunk["use_layernorm"])


def copy_by_order(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Our state dict filled with the reference tensors, module by module in registration order (both networks register
    their layers in the same order); every pair must agree in kind (weight/bias) and shape, else one line names it."""
    ours_items, theirs_items = list(ours.items()), list(theirs.items())
    if len(ours_items) != len(theirs_items):
        raise ConversionError(f"the reference {what} has {len(theirs_items)} tensors, the network its sizes describe here "
                              f"has {len(ours_items)}; it is not a layout this importer knows")
    out = {}
    for (k, v), (rk, rv) in zip(ours_items, theirs_items):
        if v.shape != rv.shape or k.rsplit(".", 1)[-1] != rk.rsplit(".", 1)[-1]:
            raise ConversionError(f"the reference {what}'s tensor network.{rk} {tuple(rv.shape)} does not fit {k} "
                                  f"{tuple(v.shape)} of the network its sizes describe here")
        out[k] = rv.detach().clone().float()
    return out


def convert(ref: dict[str, Any], path: str, task: Task, normalizer: Normalizer, overrides: dict[str, Any] | None = None,
            log: Any = print) -> dict[str, Any]:
    """This project's checkpoint (header, normalisation, `ema` weights) of a reference pre-training checkpoint."""
    kind = detect_kind(ref["model"], ref)
    # The weights the reference fine-tunes: its diffusion policies load `ema` (model/diffusion/diffusion.py,
    # DiffusionModel.__init__), its Gaussian policies `model` (model/common/gaussian.py, GaussianModel.__init__).
    weights_key = (overrides or {}).get("weights") or ("model" if kind == "gaussian_mlp" else "ema")
    if not isinstance(ref.get(weights_key), dict):
        raise ConversionError(f"the reference checkpoint {path!r} has no {weights_key!r} weights")
    sd = ref[weights_key]
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConversionError(f"the reference checkpoint {path!r} has non-finite values in {bad[0]}; it cannot be used")
    cfg = reference_config(task, kind, overrides)
    net_sd = _network(sd)
    header: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "task": task.id, "obs_dim": task.obs_dim,
                              "action_dim": task.action_dim, "normalization": normalizer.state_dict(), "args": {}}
    if kind == "gaussian_mlp":
        arch = gaussian_mlp_arch(net_sd, task, cfg)
        net = ChunkMLP(**arch)
        mean_sd = {k: v for k, v in net_sd.items() if k.startswith("mlp_mean.")}
        weights = {f"network.{k}": v for k, v in copy_by_order(net.state_dict(), mean_sd, REFERENCE_NETWORKS[kind]).items()}
        logvar = net_sd.get("logvar")
        log_std = 0.5 * logvar.float() if logvar is not None else torch.full((task.action_dim,),
                                                                              float(torch.tensor(cfg["fixed_std"]).log()))
        weights["log_std"] = log_std.detach().clone()
        # The reference's Gaussian fine-tuning loads the checkpoint with strict=False, so the checkpoint's own
        # logvar_min/max (pre-training's std_min/std_max) replace the fine-tuning config's (model/rl/gaussian_ppo.py
        # builds on GaussianModel, which calls load_state_dict(..., strict=False)): we keep the limits it really used.
        std_limits = [round(float((0.5 * net_sd[k].float()).exp()), 6) for k in ("logvar_min", "logvar_max")]
        header.update(policy="gaussian", backbone="mlp", arch=arch, horizon_steps=arch["horizon_steps"],
                      cond_steps=arch["cond_steps"], std_limits=std_limits)
    else:
        if kind == "diffusion_mlp":
            arch = diffusion_mlp_arch(net_sd, task, cfg)
            net: torch.nn.Module = DiffusionMLP(**arch)
            horizon, cond_steps = arch["horizon_steps"], arch["cond_steps"]
        else:
            arch = diffusion_unet_arch(net_sd, task, cfg)
            if arch["action_dim"] != task.action_dim:
                raise ConversionError(f"the reference Unet1D acts in {arch['action_dim']} dimensions, {task.id} in "
                                      f"{task.action_dim}: is it a checkpoint of another task?")
            net = UNet1D(**arch)
            horizon, cond_steps = cfg["horizon_steps"], _split_cond(task, arch["cond_dim"], "cond_encoder")
        weights = copy_by_order(net.state_dict(), net_sd, REFERENCE_NETWORKS[kind])
        header.update(policy="diffusion", backbone="mlp" if kind == "diffusion_mlp" else "unet", arch=arch,
                      horizon_steps=horizon, cond_steps=cond_steps, denoising_steps=int(cfg["denoising_steps"]))
    from_weights = {k: v for k, v in arch.items() if k not in cfg}
    if "std_limits" in header:  # the Gaussian's std range: its logvar_min/max tensors
        from_weights["std_limits"] = header["std_limits"]
    from_config = {k: v for k, v in cfg.items() if k in arch or k in ("denoising_steps", "horizon_steps", "fixed_std")}
    check_policy_numbers(header, f"the checkpoint converted from {path!r}")  # what every load of it checks
    log(f"imported {REFERENCE} {kind.replace('_', ' ')} policy from {path} ({weights_key} weights, epoch "
        f"{ref.get('epoch', '?')}): read from the weights {_fmt(from_weights)}; from the reference config "
        f"{config_path(task, kind)} {_fmt(from_config)}")
    return {**header, "source": {"reference_checkpoint": os.path.abspath(path), "kind": kind, "weights": weights_key,
                                 "epoch": int(ref["epoch"]) if isinstance(ref.get("epoch"), int) else -1},
            "ema": weights}


def _fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("action_dim", "obs_dim", "out_dim"))


# ---- where the paper's files live here, and fetching them ----

def paper_dir(task: Task) -> str:
    root = os.environ.get("DPPO_DATA_DIR") or str(REPO_ROOT / "data")
    return os.path.join(root, task.id, "paper")


def _paper_entry(task: Task) -> tuple[str, str, dict[str, tuple[str, str | None]]]:
    if task.id not in PAPER_FILES:
        raise TaskError(f"{REFERENCE} publishes no checkpoint or dataset for {task.id}")
    return PAPER_FILES[task.id]


def fetch_drive_file(file_id: str | None, dest: str, what: str) -> str:
    """`dest`, downloaded from Google Drive first if missing (format-checked: an HTML page or a cut-off file is refused)."""
    if os.path.exists(dest):
        return dest
    if file_id is None:
        raise DatasetError(f"{REFERENCE} lists the {what} but publishes no download address for it; put the file at {dest}")
    print(f"fetching the paper's {what} (Google Drive file {file_id}) to {dest}")
    download(DRIVE_FILE.format(file_id), dest)
    return dest


def normalization_name(task: Task) -> str:
    """The reference's furniture statistics are a torch `normalization.pth`, every other suite's a `normalization.npz`."""
    return "normalization.pth" if task.suite == "furniture" else "normalization.npz"


def paper_normalization(task: Task) -> str:
    """The reference's normalisation file of the task, in `paper_dir(task)` (downloaded once)."""
    return fetch_drive_file(_paper_entry(task)[1], os.path.join(paper_dir(task), normalization_name(task)),
                            f"normalisation statistics of {task.id}")


def paper_checkpoint(task: Task, kind: str = "diffusion_mlp") -> str:
    """The reference's published pre-training checkpoint of `kind` for the task (downloaded once), as a file path."""
    checkpoints = _paper_entry(task)[2]
    if kind not in checkpoints:
        raise TaskError(f"{REFERENCE} publishes no {kind.replace('_', ' ')} checkpoint for {task.id} "
                        f"(it has: {', '.join(sorted(checkpoints))})")
    run_path, file_id = checkpoints[kind]
    name = run_path.split("/")[0] + "_" + os.path.basename(run_path)  # e.g. square_pre_diffusion_mlp_ta4_td20_state_8000.pt
    return fetch_drive_file(file_id, os.path.join(paper_dir(task), name), f"{kind.replace('_', ' ')} checkpoint of {task.id}")


def paper_dataset(task: Task) -> str:
    """The reference's `train.npz` (+ `normalization.npz` beside it) of the task, in `paper_dir(task)`.

    The reference publishes each dataset as a Google Drive folder: `gdown` lists the folder, and each file is fetched
    and format-checked by `loaders.datasets.download`."""
    folder_id = _paper_entry(task)[0]
    dest = os.path.join(paper_dir(task), "train.npz")
    url = DRIVE_FOLDER.format(folder_id)
    if os.path.exists(dest):  # its data is normalised: without the statistics it would be trained on as if raw
        stats = os.path.join(paper_dir(task), normalization_name(task))
        if not os.path.exists(stats):
            raise DatasetError(f"{dest} holds the reference's normalised data, which needs its statistics {stats} "
                               f"beside it: download {normalization_name(task)} from {url} and put it there (or delete "
                               f"{dest} to fetch both again)")
        return dest
    hint = f"download train.npz and {normalization_name(task)} from {url} by hand and put them in {paper_dir(task)}"
    try:
        import gdown
    except ImportError:
        raise DatasetError(f"listing the reference's dataset folder needs gdown (pip install gdown), or {hint}") from None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = gdown.download_folder(id=folder_id, output=tmp, quiet=True, skip_download=True) or []
    except Exception as e:  # noqa: BLE001 - gdown raises many types (offline, rate limits, page layout changes)
        raise DatasetError(f"could not list the Google Drive folder {url} ({' '.join(str(e).split())[:200]}); "
                           f"{hint}") from None
    by_name = {os.path.basename(getattr(f, "path", "")): getattr(f, "id", None) for f in files}
    for name in ("train.npz", normalization_name(task)):
        if name not in by_name:
            found = ", ".join(sorted(by_name)) or "nothing"
            raise DatasetError(f"the Google Drive folder {url} has no {name} (found: {found}); {hint}")
    fetch_drive_file(by_name[normalization_name(task)], os.path.join(paper_dir(task), normalization_name(task)),
                     f"normalisation statistics of {task.id}")
    return fetch_drive_file(by_name["train.npz"], dest, f"dataset of {task.id}")


def find_normalization(checkpoint_path: str, task: Task) -> str:
    """The `normalization.npz` a reference checkpoint needs: beside the checkpoint, else the task's paper folder
    (downloaded there once from the reference's address)."""
    for name in ("normalization.npz", "normalization.pth"):
        beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), name)
        if os.path.exists(beside):
            return beside
    return paper_normalization(task)


def load_reference(path: str, ref: dict[str, Any], task: Task | None, normalization: str | None = None,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`convert` with the normalisation found for it (`normalization`, beside the file, or the paper's)."""
    if task is None:
        raise ConversionError(f"{path!r} is a reference checkpoint: converting it needs the task (--env-id)")
    detect_kind(ref["model"], ref)  # a policy that cannot be imported is refused before its statistics are looked for
    norm_path = normalization or find_normalization(path, task)
    normalizer = read_normalization(norm_path)
    check_policy_numbers({"normalization": normalizer.state_dict()}, norm_path)  # finite, min <= max
    if normalizer.obs_min.numel() != task.obs_dim or normalizer.action_min.numel() != task.action_dim:
        raise ConversionError(f"{norm_path} normalises {normalizer.obs_min.numel()} observation and "
                              f"{normalizer.action_min.numel()} action dimensions, {task.id} has {task.obs_dim} and "
                              f"{task.action_dim}: is it the file of another task?")
    print(f"normalisation statistics: {norm_path}")
    return convert(ref, path, task, normalizer, overrides)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals (a missing argument, a bad number) are one line and exit code 2, as the scripts'."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m loaders.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a reference pre-training checkpoint (state_<epoch>.pt), or 'paper' for the task's "
                                      "published one (downloaded)")
    p.add_argument("--env-id", required=True, help="the task it was trained on (e.g. square, hopper, avoid-m2)")
    p.add_argument("--kind", default="diffusion_mlp", choices=["diffusion_mlp", "diffusion_unet", "gaussian_mlp"],
                   help="with 'paper': which published policy")
    p.add_argument("--normalization", help="the task's normalization.npz (furniture: normalization.pth) (default: beside "
                                           "the checkpoint, else the paper's, downloaded)")
    p.add_argument("--output", help="where to write the converted checkpoint, its folder made if missing (default: "
                                     "<checkpoint>.dppo.pt)")
    p.add_argument("--denoising-steps", type=int, help="K, when not the reference config's")
    p.add_argument("--activation", choices=["relu", "mish", "tanh", "elu", "gelu"], help="when not the reference config's")
    p.add_argument("--weights", choices=["ema", "model"], help="which weights of the file (default: what the reference "
                                                                "fine-tunes: ema for diffusion, model for Gaussian)")
    a = p.parse_args(argv)
    why = POSITIVE.refusal(a.denoising_steps) if a.denoising_steps is not None else None  # dppo_pretrain.py's rule
    if why:
        p.error(f"--denoising-steps {why} (got {a.denoising_steps})")
    try:
        task = get_task(a.env_id)
        path = paper_checkpoint(task, a.kind) if a.checkpoint == "paper" else a.checkpoint
        out = a.output or os.path.splitext(path)[0] + ".dppo.pt"
        check_output_path(out)
        ckpt = read_reference(path)
        converted = load_reference(path, ckpt, task, a.normalization,
                                   dict(denoising_steps=a.denoising_steps, activation=a.activation, weights=a.weights))
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # as check_output_path allows
        save_checkpoint(out, converted)  # a failed write: one line naming `out`, never its temp file
    except (DatasetError, TaskError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def read_reference(path: str) -> dict[str, Any]:
    """A reference checkpoint loaded as data (`weights_only=True`); one line if it is not one."""
    if os.path.isdir(path):
        raise DatasetError(f"checkpoint {path!r} is a folder; give the reference's checkpoint file (state_<epoch>.pt)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"checkpoint {path!r} is not a readable checkpoint ({type(e).__name__})") from None
    if is_reinflow_checkpoint(ckpt):
        raise DatasetError(f"{path!r} was saved by ReinFlow's code: {REINFLOW_HINT}")
    if not is_reference_checkpoint(ckpt):
        raise DatasetError(f"{path!r} is not a checkpoint of {REFERENCE} (no 'model' state dict of network.* tensors)")
    return ckpt


if __name__ == "__main__":
    sys.exit(main())
