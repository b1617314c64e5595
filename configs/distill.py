"""rkd_jax configuration: teacher, student and distillation in one file.

`python -m rkd_jax.main --config=configs/distill.py[:VARIANT]` with VARIANT one of
  (empty)  the embedded miniature: trains a narrow ResNet teacher, then distils it into a
           narrower student on the generated RefCOCO-style data (about 14 min on 2 CPU cores);
  tiny     a seconds-long smoke configuration (tests, CI);
  lite0    the miniature with the ImageNet EfficientNet-Lite0 student (offline weights);
  paper    the paper's settings: ResNet-101 + BERT-base teacher, ResNet-18 + first 4 BERT
           layers student, 384x384, 20 tokens, AdamW 2e-5 x0.1 after epoch 20, batch 16;
  paper_b0 the paper's settings with the EfficientNet-B0 student.
Any field can be overridden on the command line: --config.train.epochs=3.
"""

import ml_collections

VARIANTS = ("", "tiny", "lite0", "paper", "paper_b0")


def model_config(**overrides) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.backbone = (
        "resnet18"  # resnet18|resnet34|resnet50|resnet101|efficientnet_b0|efficientnet_lite0
    )
    m.backbone_width = 64  # ResNet base width (torchvision: 64); narrower for CPU miniatures
    m.backbone_stage_sizes = ()  # ResNet blocks per stage; () = the named network's own
    m.backbone_weights = ""  # .pth/.safetensors (torchvision, timm, lukemelas); "offline" = Lite0's
    m.text_encoder_dir = ""  # HF BERT directory (config.json, vocab, weights); "" = offline MiniLM
    m.text_num_layers = 6  # keep the first N encoder layers of the checkpoint
    m.text_trainable = False  # fine-tune the text encoder (paper) or keep it frozen
    m.text_pretrained = True  # load the text encoder's weights from text_encoder_dir
    m.fusion_dim = 256  # C': projection width of V_Q, T_K, T_V in the cross-attention
    m.fpn_dim = 256  # channels of the FPN decoder output D (teacher and student must match)
    m.attention_norm = "softmax"  # normalisation of A: softmax over words | none (literal Eq. 4)
    # Beyond the paper: concatenate each pixel's 8-D coordinates (Hu et al., 2016) to V in the
    # fusion's query and output projection, so location words can be grounded.
    m.coord_map = False
    # add: V' = V + Linear(O) (the paper) | multiply: V' = V * (1 + Linear(O)) (beyond it)
    m.fusion_mode = "add"
    # Beyond the paper: > 0 = a category classifier (this many classes, ids 0..N-1) on the
    # visual features entering each fusion, trained on the referred object's category
    # (distill.category_weight): object knowledge for a backbone that starts from scratch,
    # where the paper's start from ImageNet. 0 = off (the paper).
    m.category_classes = 0
    m.update(overrides)
    return m


def train_config(**overrides) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.batch_size = 16  # global batch (split over processes and devices)
    t.epochs = 3  # epochs over the referred objects of the train split
    t.lr = 1e-3  # AdamW initial learning rate
    t.lr_decay_epochs = (2,)  # multiply lr by lr_decay_factor at these epochs
    t.lr_decay_factor = 0.1  # the paper's step decay
    t.warmup_steps = 0  # linear warm-up steps (0 = none)
    t.weight_decay = 0.01  # AdamW decoupled weight decay (not on biases, norms, embeddings)
    t.grad_clip_norm = 0.0  # clip gradients to this global norm (0 = off)
    # Beyond the paper: the image backbone's lr is lr * backbone_lr_mult (1 = the same).
    t.backbone_lr_mult = 1.0
    t.update(overrides)
    return t


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variant = (arg or "").strip()
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown config variant {variant!r}; valid: {', '.join(map(repr, VARIANTS))}"
        )
    c = ml_collections.ConfigDict()
    c.variant = variant  # which of VARIANTS built this config (informational)
    c.mode = "distill"  # what main trains: teacher | student | distill
    c.seed = 0  # parameter init and data order
    c.teacher_checkpoint = ""  # trained teacher (run dir or checkpoint dir); "" = train it first
    # distill: also train the same student without the teacher (same seed and schedule) in
    # <workdir>/student_alone and write results/comparison.{md,json}: teacher, student alone and
    # distilled student on every eval split, so the job shows what distillation did.
    c.student_alone = True

    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # REFER root (instances.json, refs(*).p, images/...); "" = embedded data
    c.data.image_dir = ""  # COCO train2014 images kept apart from root; "" = under root/images
    c.data.dataset = "refcoco"  # refcoco | refcoco+ | refcocog
    c.data.split_by = "unc"  # unc (refcoco, refcoco+) | umd, google (refcocog)
    c.data.train_split = "train"  # split the models train on
    c.data.val_split = "val"  # split for periodic validation and best-checkpoint selection
    c.data.eval_splits = ("val", "testA", "testB")  # splits scored by --mode=eval / after training
    c.data.data_dir = ""  # TFDS cache of prepared examples; "" = ~/.cache/rkd_jax/tfds
    c.data.image_size = 96  # square network input (squash resize)
    c.data.max_tokens = 12  # token limit incl. [CLS]/[SEP] (paper: 20)
    c.data.num_workers = 0  # grain worker processes (0 = in the training process)
    c.data.skip_corrupt_images = False  # skip (and count) unreadable images instead of failing
    # Refs with a broken annotation (NaN/outside coordinates, < 3 points, empty mask), an unknown
    # split or no sentence: False = stop naming the first; True = leave them out and count them.
    c.data.skip_invalid_annotations = False
    c.data.synthetic_num_images = 1600  # size of the embedded dataset (all splits; Table I's)
    c.data.synthetic_seed = 0  # generator seed of the embedded dataset

    # Miniature sizes from docs/miniature.md. The student's width, 12, was chosen on val
    # (refcoco, seed 0, 12 epochs alone: width 16 49.93, 12 47.31, 8 45.77) so that the
    # converged teacher (52.16) leads it by 5-15 points, the paper's regime (docs/table1.md).
    c.teacher = model_config(
        backbone="resnet18", backbone_width=32, fusion_dim=128, fpn_dim=64, text_num_layers=6
    )
    c.student = model_config(
        backbone="resnet18",
        backbone_width=12,
        backbone_stage_sizes=(1, 1, 1, 1),
        fusion_dim=64,
        fpn_dim=64,
        text_num_layers=2,
    )

    # The default job fits 15 minutes of 2 CPU cores: the teacher gets more epochs than the
    # students (per epoch the two learn about as fast; docs/table1.md has the curves), launch.sh's
    # Table I trains the teacher 24 epochs and every student 12.
    c.teacher_train = train_config(epochs=8, lr=1e-3, lr_decay_epochs=(6,))  # teacher phase
    c.train = train_config(epochs=6, lr=1e-3, lr_decay_epochs=(4,))  # student / distill phase

    c.distill = ml_collections.ConfigDict()
    # vl_channel (the paper: L_VL + L_C; "rkd" is an old alias that warns, since "rkd" means
    # Park et al.'s distance/angle KD elsewhere) | none | logit_kd | skd | cwd | ickd
    c.distill.method = "vl_channel"
    c.distill.lambda_vl = 0.5  # lambda1 of Eq. (9); 0 = ablation without L_VL
    c.distill.lambda_channel = 0.5  # lambda2 of Eq. (9); 0 = ablation without L_C
    c.distill.channel_norm = "hw"  # D^T D scale: hw (divide by HW) | l2 (unit channels: cosines)
    # L_seg: ce (2-class softmax cross-entropy, the paper) | bce (the same function) | ce_dice
    # (beyond the paper: + soft Dice per image, so small objects weigh as much as large ones;
    # the miniature's default: +12.6 val mIoU after 4 epochs of the student, docs/miniature.md)
    c.distill.seg_loss = "ce_dice"
    c.distill.category_weight = 1.0  # weight of the category loss (models with category_classes)
    c.distill.skd_pool_scale = 0.5  # skd: pool the map by this factor before pairing (0 = none)
    c.distill.kd_temperature = 1.0  # logit_kd: softmax temperature
    c.distill.kd_weight = 10.0  # logit_kd: loss weight (SKD paper's pixel-wise KD setting)
    c.distill.skd_weight = 1.0  # skd: pair-wise similarity loss weight
    c.distill.cwd_tau = 4.0  # cwd: spatial softmax temperature
    c.distill.cwd_weight = 3.0  # cwd: loss weight
    c.distill.ickd_weight = 2.5  # ickd: loss weight (ICKD's released setting)
    c.distill.ickd_adapter = True  # ickd: learned 1x1 conv + BN on the student's features (ICKD's)

    c.run = ml_collections.ConfigDict()
    c.run.compute_dtype = "auto"  # auto (bf16 on GPU, f32 on CPU) | float32 | bfloat16
    c.run.cache_text_features = True  # frozen text encoder: features once per unique sentence
    # Directory shared by runs for those features ('' = recompute in every run); keyed by a
    # fingerprint of encoder weights, model config, sentences, dtype, backend and jax version.
    c.run.text_cache_dir = ""
    # Distillation: compute the frozen teacher's targets (its A maps, A_c, logits: what the
    # method compares with) once per (image, sentence) pair of the train split and look them up
    # in the step instead of running the teacher (no augmentation, so they never change); the
    # step then costs about a student step. Kept in memory on every device, so for small data
    # (~25 KB per pair at 96 px): on in the miniature, off in the paper variants (39 GB for
    # RefCOCO) and in tiny (its tests run the teacher in the step; tests/test_teacher_targets.py
    # shows the two give the same losses and gradients).
    c.run.cache_teacher_targets = True
    c.run.log_every_steps = 50  # host sync + JSONL/TensorBoard/progress logging period
    c.run.eval_every_epochs = 1  # validation (mIoU, oIoU) period, in epochs
    c.run.checkpoint_every_steps = 500  # periodic checkpoint period (also at every validation)
    c.run.keep_checkpoints = 2  # most recent checkpoints kept (the best one is kept too)
    c.run.eval_batch_size = 64  # evaluation batch (fixed shape; the last batch is padded)
    c.run.max_steps = -1  # stop each phase after this many steps (-1 = full schedule; smoke tests)
    c.run.max_eval_examples = -1  # score at most this many sentences per split (-1 = all)
    c.run.threshold = 0.5  # foreground probability threshold for masks

    if variant == "tiny":
        c.data.synthetic_num_images = 48
        c.data.image_size = 64
        c.data.max_tokens = 12
        c.teacher = model_config(
            backbone="resnet18",
            backbone_width=8,
            backbone_stage_sizes=(1, 1, 1, 1),
            fusion_dim=16,
            fpn_dim=16,
            text_num_layers=1,
        )
        c.student = model_config(
            backbone="resnet18",
            backbone_width=8,
            backbone_stage_sizes=(1, 1, 1, 1),
            fusion_dim=8,
            fpn_dim=16,
            text_num_layers=1,
        )
        c.teacher_train = train_config(batch_size=8, epochs=1, lr_decay_epochs=())
        c.train = train_config(batch_size=8, epochs=1, lr_decay_epochs=())
        c.run.log_every_steps = 2
        c.run.checkpoint_every_steps = 2
        c.run.eval_batch_size = 16
        c.run.max_eval_examples = 32
        c.run.cache_teacher_targets = False
        c.student_alone = False
    elif variant == "lite0":
        c.student = model_config(
            backbone="efficientnet_lite0",
            backbone_weights="offline",
            fusion_dim=64,
            fpn_dim=64,
            text_num_layers=2,
        )
        # The ImageNet backbone fine-tunes at 0.3 of the fresh layers' lr: at 0.1 refcoco+
        # gained and refcoco lost (seed 0, 12 epochs; docs/table1.md, "The Lite0 schedule"),
        # at 0.3 with decays at 8 and 10 both probes ended about 4 val points higher.
        c.train.backbone_lr_mult = 0.3
    elif variant in ("paper", "paper_b0"):
        c.data.image_size = 384
        c.data.max_tokens = 20
        c.teacher = model_config(backbone="resnet101", text_num_layers=12, text_trainable=True)
        c.student = model_config(
            backbone="resnet18" if variant == "paper" else "efficientnet_b0",
            text_num_layers=4,
            text_trainable=True,
        )
        paper = dict(epochs=40, lr=2e-5, lr_decay_epochs=(20,), batch_size=16)
        c.teacher_train = train_config(**paper)
        c.train = train_config(**paper)
        c.distill.seg_loss = "ce"  # the paper's L_seg
        c.student_alone = False  # launch.sh --paper trains the student-alone rows itself
        c.run.cache_text_features = False
        c.run.cache_teacher_targets = False
        c.run.log_every_steps = 100
        c.run.checkpoint_every_steps = 2000
        c.run.eval_batch_size = 32
        # 12 grain workers feed 1.5x the H100's distill step at batch 16 on a 16-core host
        # (docs/speed.md, "Feeding a GPU": ~99 images/s per worker at 384 px from COCO-sized
        # JPEGs); on a smaller host use about its cores minus 3.
        c.data.num_workers = 12
    return c
