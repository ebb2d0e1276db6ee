"""optax gradient transformations for memory- and communication-efficient training."""

from optim.coordinate_clip import clip_top as clip_top
from optim.coordinate_clip import coordinate_clip as coordinate_clip
from optim.coordinate_clip import top_fraction_threshold as top_fraction_threshold
from optim.coordinate_clipped import adam_coordinate_clipped as adam_coordinate_clipped
from optim.coordinate_clipped import (
    scale_by_adam_coordinate_clipped as scale_by_adam_coordinate_clipped,
)
from optim.coordinate_clipped import sgd_coordinate_clipped as sgd_coordinate_clipped
from optim.decay_after_update import (
    scale_and_decay_after_update as scale_and_decay_after_update,
)
from optim.diffgrad import ScaleByDiffGradState as ScaleByDiffGradState
from optim.diffgrad import diffgrad as diffgrad
from optim.diffgrad import scale_by_diffgrad as scale_by_diffgrad
from optim.frugal import FrugalState as FrugalState
from optim.frugal import default_projectable as default_projectable
from optim.frugal import frugal as frugal
from optim.frugal import frugal_projections as frugal_projections
from optim.frugal import scale_by_frugal as scale_by_frugal
from optim.momentum_reset import clip_spikes as clip_spikes
from optim.momentum_reset import periodic_reset as periodic_reset
from optim.momentum_reset import scale_by_spam_warmup as scale_by_spam_warmup
from optim.spam import ScaleBySpamState as ScaleBySpamState
from optim.spam import scale_by_spam as scale_by_spam
from optim.spam import spam as spam
from optim.spam import spam_warmup_factor as spam_warmup_factor
