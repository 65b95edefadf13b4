"""The model_config of a training run: MemTransformerLM's constructor arguments derived from the flags."""
from utils.io.errors import UserError

# the model_config keys that fix the shapes of the weights: a checkpoint resumes only into the same ones
ARCHITECTURE_KEYS = ("n_token", "n_layer", "n_head", "d_model", "d_head", "d_inner", "d_embed", "div_val",
                     "cutoffs", "tie_weight", "attn_type", "pre_lnorm")


def adaptive_cutoffs(args, n_token: int) -> tuple[list[int], list[bool]]:
    """Adaptive softmax clusters (--adaptive) as the reference chose them, and which projections are tied.

    wt103 (and wt2, which shares its vocabulary rules): [19997, 39997, 199997] with tied tail projections;
    lm1b: [59997, 99997, 639997], untied. Other vocabularies keep the wt103 cutoffs that fall inside them
    (the reference used cutoffs larger than the vocabulary for BPE).
    """
    if not args.adaptive:
        return [], [False]
    if args.dataset == "lm1b":
        cutoffs, tie_projs = [59997, 99997, 639997], [False, False, False, False]
    else:
        cutoffs, tie_projs = [19997, 39997, 199997], [False, True, True, True]
    kept = [c for c in cutoffs if c < n_token - 1]
    if not kept:
        raise UserError(f"--adaptive needs a vocabulary larger than {cutoffs[0] + 1} tokens, this one has "
                        f"{n_token}; drop --adaptive")
    return kept, tie_projs[: len(kept) + 1]


def build_model_config(args, n_token: int) -> dict:
    cutoffs, tie_projs = adaptive_cutoffs(args, n_token)
    return dict(
        n_token=n_token, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, d_head=args.d_head,
        d_inner=args.d_inner, dropout=args.dropout, dropatt=args.dropatt, dtype=None, tie_weight=args.tied,
        d_embed=args.d_embed, div_val=args.div_val, tie_projs=tie_projs, pre_lnorm=args.pre_lnorm,
        tgt_len=args.tgt_len, ext_len=args.ext_len, mem_len=args.mem_len, cutoffs=cutoffs,
        same_length=args.same_length, attn_type=args.attn_type, clamp_len=args.clamp_len,
        sample_softmax=args.sample_softmax,
    )


def architecture_differences(saved: dict, current: dict) -> list[str]:
    """`key=saved value` for each architecture key in which two model_configs differ."""
    return [f"{k}={saved.get(k)}" for k in ARCHITECTURE_KEYS if saved.get(k) != current.get(k)]
