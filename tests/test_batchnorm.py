import pytest
import torch
from helpers import max_output_diff, permuted_twin

from ccamerge.api import merge
from ccamerge.batchnorm import conv_bn_pairs, fold_state
from ccamerge.errors import CcamergeError
from ccamerge.models import build_model
from ccamerge.transform import with_state


def test_pairs_cover_every_conv_batchnorm_of_a_resnet():
    pairs = conv_bn_pairs(build_model("resnet20", width=0.5, blocks=2))
    assert ("conv", "bn") in pairs
    assert ("stages.1.0.shortcut.0", "stages.1.0.shortcut.1") in pairs
    assert ("stages.2.1.conv2", "stages.2.1.bn2") in pairs
    assert len(pairs) == 1 + 3 * 2 * 2 + 2


def test_folding_keeps_the_function(vgg_bn, digits):
    model = vgg_bn[0]
    folded = with_state(model, fold_state(model.state_dict(), conv_bn_pairs(model)))
    assert max_output_diff(model, folded, digits.x_test) < 1e-4
    bn = dict(folded.named_modules())[conv_bn_pairs(model)[0][1]]
    assert torch.all(bn.weight == 1) and torch.all(bn.running_mean == 0)


@pytest.mark.parametrize("method", ["cca", "permute"])
def test_fold_policy_returns_a_model_merged_with_itself(method, vgg_bn, digits):
    merged = merge([vgg_bn[0]] * 2, digits.x_train[:300], method, bn_policy="fold").model
    assert max_output_diff(merged, vgg_bn[0], digits.x_test) < 1e-2
    assert merged.info["merge"]["bn_policy"] == "fold"


def test_fold_policy_recovers_a_planted_permutation(resnets, digits):
    model = resnets[0]
    merged = merge([model, permuted_twin(model, seed=2)], digits.x_train[:300], "permute",
                   bn_policy="fold", bn_reset=False).model
    assert max_output_diff(merged, model, digits.x_test[:200]) < 1e-3


def test_unknown_policy_is_refused(vgg_bn, digits):
    with pytest.raises(CcamergeError, match="bn_policy"):
        merge(vgg_bn, digits.x_train[:100], "permute", bn_policy="magic")
