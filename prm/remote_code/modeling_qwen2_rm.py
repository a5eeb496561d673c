"""A Qwen2 process reward model in the layout of Qwen2.5-Math-PRM's hub repo, written for this
project's tiny stand-in (prm.tiny.qwen_prm); not Qwen's code.

The layout (what a loader has to find): architectures ["Qwen2ForProcessRewardModel"], the
decoder under `model.` (Qwen2Model), and a `score` head Linear(hidden, hidden) -> ReLU ->
Linear(hidden, num_labels = 2) applied at every token; the output's `logits` are [B, T, 2]
and a step's score is softmax(logits)[..., 1] at its `<extra_0>` separator. vLLM implements
the same architecture natively (vllm/model_executor/models/qwen2_rm.py), which loads these
weights by name; transformers loads this file through config.json's auto_map.
"""

from torch import nn
from transformers import Qwen2Model, Qwen2PreTrainedModel
from transformers.modeling_outputs import TokenClassifierOutput

from .configuration_qwen2_rm import Qwen2RMConfig


class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
    config_class = Qwen2RMConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                                   nn.Linear(config.hidden_size, config.num_labels))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
        return TokenClassifierOutput(logits=self.score(hidden))
