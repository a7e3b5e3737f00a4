"""The direct-loss family: `direct-align train` offline and online, `label` and `select`.

``settings``: the settings of `train` (and the ones `label` and `select` share);
``reference``: reference log-probs computed once and cached on disk; ``evaluate``: held-out pair
metrics; ``offline``: the offline loop; ``online``: rounds of sample → judge → pair → steps;
``label``: `label` and `select` (``label_settings``: their settings); ``run``: the `train`
command; ``report``: the table it prints.
"""
