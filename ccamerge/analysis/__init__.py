"""Why a merge works or fails: feature matching (``features``), diagnosis and its checklist
(``diagnose``, ``checklist``), the feature explorer (``explorer``) and the teaching steps
(``teach``). Everything here reads statistics and merges through :mod:`ccamerge.api`."""
