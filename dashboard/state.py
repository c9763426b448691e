"""Session-state keys in one place, and typed access to what the sidebar selected.

Everything a session uploads or computes for itself lives under these keys in ``st.session_state``
(never in a module global or a cache keyed by anything but content), so one browser session never
sees another's uploads or results.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

# Plain values (not widgets)
MODELS = "ccm_models"                  # dict id -> registry.ModelEntry, in load order
DATASETS = "ccm_datasets"              # dict key -> registry.DatasetEntry (uploaded .npz)
SESSION_DIR = "ccm_session_dir"        # SessionDir: this session's private temp folder
SELECTION = "ccm_selection"            # Selection made by the sidebar in this run
UPLOAD_MESSAGES = "ccm_upload_messages"  # list of (level, text) from the last uploads
PROCESSED_UPLOADS = "ccm_processed_uploads"  # uploader file ids already handled
RECENT_UPLOADS = "ccm_recent_uploads"  # model ids uploaded since the last new selection
MERGE_RESULTS = "ccm_merge_results"    # the last merge run (dict), survives page switches
DEMO_LOADED = "ccm_demo_loaded"        # the demo zoo was added to this session
APPLIED = "ccm_applied"                # {"method", "options", "source"}: the last setting applied

# Widget keys: sidebar
W_MODELS = "w_models"
W_REFERENCE = "w_reference"
W_DATASET = "w_dataset"
# Widget keys: models page
W_MODEL_UPLOAD = "w_model_upload"
W_DATA_UPLOAD = "w_data_upload"
W_PT_ARCH = "w_pt_arch"
W_PT_CONFIG = "w_pt_config"
W_TRUST_CODE = "w_trust_code"          # "I trust this archive's code" (TorchScript uploads)
W_NEW_SELECTION = "w_new_selection"    # "Start a new selection from these uploads"
# Widget keys: spectra page
W_SPEC_GAMMA = "w_spec_gamma"
W_SPEC_RELATIVE = "w_spec_relative"
W_SPEC_MODEL = "w_spec_model"
# Widget keys: feature page
W_FEAT_MODEL = "w_feat_model"
W_FEAT_POINT = "w_feat_point"
W_FEAT_GAMMA = "w_feat_gamma"
W_FEAT_RELATIVE = "w_feat_relative"
W_FEAT_VIEW = "w_feat_view"
W_FEAT_START = "w_feat_start"
W_FEAT_ORDER = "w_feat_order"
# Widget keys: interpolation page
W_INTERP_A = "w_interp_a"
W_INTERP_B = "w_interp_b"
W_INTERP_METHODS = "w_interp_methods"
W_INTERP_STEPS = "w_interp_steps"
W_INTERP_BN = "w_interp_bn"
# Widget keys: merge page (method options: w_opt_<method>_<option>)
W_MERGE_METHODS = "w_merge_methods"
W_MERGE_BN = "w_merge_bn"
W_MERGE_REPAIR = "w_merge_repair"
W_MERGE_CURVE = "w_merge_curve"
W_MERGE_BN_POLICY = "w_merge_bn_policy"
W_MERGE_RESET_BASE = "w_merge_reset_base"
W_MERGE_STREAM = "w_merge_stream"
W_MERGE_TARGET_WIDTH = "w_merge_target_width"
W_MERGE_RUN = "w_merge_run"
W_MERGE_DOWNLOAD_METHOD = "w_merge_download_method"
# Widget keys: merge points page
W_POINTS_MODEL = "w_points_model"
# Widget keys: diagnosis page (method options: w_diag_opt_<method>_<option>)
W_DIAG_METHOD = "w_diag_method"
W_DIAG_BN = "w_diag_bn"
W_DIAG_SWEEP = "w_diag_sweep"
# Widget keys: feature explorer page
W_EXPL_MODEL = "w_expl_model"
W_EXPL_POINT = "w_expl_point"
W_EXPL_METHOD = "w_expl_method"
W_EXPL_SAMPLES = "w_expl_samples"
W_EXPL_EMBEDDING = "w_expl_embedding"
# Widget keys: teaching page
W_TEACH_MODEL = "w_teach_model"
W_TEACH_POINT = "w_teach_point"
W_TEACH_GAMMA = "w_teach_gamma"
W_TEACH_RELATIVE = "w_teach_relative"


# Pages whose method-option widgets (prefix) and method pickers take an applied setting
APPLY_TO = {"merge": W_MERGE_METHODS, "interp": W_INTERP_METHODS}
W_DIAG_APPLY = "w_diag_apply"          # "apply this setting" buttons: w_diag_apply_<where>


def option_key(prefix: str, method: str, option: str) -> str:
    """Widget key of one method option, e.g. ``w_merge_opt_cca_gamma``."""
    return f"w_{prefix}_opt_{method}_{option}"


@dataclass(frozen=True)
class Selection:
    """What the sidebar selected: model ids (load order), the reference as an index into them,
    and the dataset key (``digits``, ``fashion-mnist``, ``npz:<sha256>`` or ``zip:<sha256>``)."""

    ids: tuple[str, ...]
    reference: int
    dataset: str

    @property
    def reference_id(self) -> str | None:
        return self.ids[self.reference] if self.ids else None

    @property
    def others(self) -> list[str]:
        return [i for k, i in enumerate(self.ids) if k != self.reference]


class SessionDir:
    """A private temp folder for one session (uploaded files as files, for recipes); removed
    when the session's state is garbage-collected or the process exits."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="ccamerge-session-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)


def init() -> None:
    """Create this session's containers once."""
    defaults = {MODELS: dict, DATASETS: dict, UPLOAD_MESSAGES: list, PROCESSED_UPLOADS: set,
                SESSION_DIR: SessionDir}
    for key, make in defaults.items():
        if key not in st.session_state:
            st.session_state[key] = make()


def session_dir() -> Path:
    return st.session_state[SESSION_DIR].path


def selection() -> Selection:
    """The selection the sidebar made in this run (empty before the sidebar ran)."""
    return st.session_state.get(SELECTION, Selection((), 0, "digits"))
