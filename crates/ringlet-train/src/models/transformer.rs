//! A small character-level transformer language model (GPT-style: learned token and position
//! embeddings, pre-norm blocks of causal self-attention and a GELU MLP, a linear head), one
//! stage per block for overlapped backward. Trained on the embedded public-domain text
//! (`data/genesis-kjv.txt`), it reports held-out loss and perplexity per character.

use super::cross_entropy_sum;
use burn::module::Module;
use burn::nn::attention::{
    generate_autoregressive_mask, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig,
};
use burn::nn::{
    Embedding, EmbeddingConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::{Device, Int, Tensor, TensorData};
use ringlet_burn::{Objective, Samples, Stages};

/// The embedded text: Genesis 1–11 in the King James Version (see `data/README.md`).
pub const TEXT: &str = include_str!("../../data/genesis-kjv.txt");

/// A text as character ids, split into a training part and a held-out tail.
#[derive(Clone, Debug)]
pub struct CharText {
    /// The characters the ids stand for, sorted.
    pub vocab: Vec<char>,
    pub train: Vec<u32>,
    pub test: Vec<u32>,
}

impl CharText {
    /// The last `holdout` fraction of `text` is held out.
    pub fn new(text: &str, holdout: f64) -> CharText {
        let mut vocab: Vec<char> = text.chars().collect();
        vocab.sort_unstable();
        vocab.dedup();
        let ids: Vec<u32> = text
            .chars()
            .map(|c| {
                vocab
                    .binary_search(&c)
                    .expect("every character is in the vocabulary") as u32
            })
            .collect();
        let split = ((ids.len() as f64) * (1.0 - holdout)).round() as usize;
        CharText {
            vocab,
            test: ids[split..].to_vec(),
            train: ids[..split].to_vec(),
        }
    }
}

/// The windows of `context` characters of one part of a text: sample `i` is the window
/// starting at character `i` (training), or at `i * context` (held out: no overlap), and its
/// targets are the same window moved on by one character.
pub struct Windows<'a> {
    pub ids: &'a [u32],
    pub context: usize,
    pub disjoint: bool,
}

impl Samples for Windows<'_> {
    type Batch = (Tensor<2, Int>, Tensor<1, Int>);
    fn len(&self) -> usize {
        let starts = self.ids.len().saturating_sub(self.context);
        if self.disjoint {
            starts / self.context.max(1)
        } else {
            starts
        }
    }
    fn batch(&self, indices: &[usize], device: &Device) -> Self::Batch {
        let c = self.context;
        let (mut x, mut y) = (
            Vec::with_capacity(indices.len() * c),
            Vec::with_capacity(indices.len() * c),
        );
        for &i in indices {
            let at = if self.disjoint { i * c } else { i };
            x.extend(self.ids[at..at + c].iter().map(|&t| i64::from(t)));
            y.extend(self.ids[at + 1..at + c + 1].iter().map(|&t| i64::from(t)));
        }
        let n = indices.len();
        (
            Tensor::<2, Int>::from_data(TensorData::new(x, [n, c]), device),
            Tensor::<1, Int>::from_data(TensorData::new(y, [n * c]), device),
        )
    }
}

#[derive(Module, Debug)]
pub struct Block {
    norm1: LayerNorm,
    attention: MultiHeadAttention,
    norm2: LayerNorm,
    up: Linear,
    down: Linear,
    gelu: Gelu,
}

impl Block {
    fn new(d_model: usize, heads: usize, device: &Device) -> Block {
        Block {
            norm1: LayerNormConfig::new(d_model).init(device),
            // No dropout: every rank must compute exactly what one process would.
            attention: MultiHeadAttentionConfig::new(d_model, heads)
                .with_dropout(0.0)
                .init(device),
            norm2: LayerNormConfig::new(d_model).init(device),
            up: LinearConfig::new(d_model, 4 * d_model).init(device),
            down: LinearConfig::new(4 * d_model, d_model).init(device),
            gelu: Gelu::new(),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let mask = generate_autoregressive_mask(batch, seq, &x.device());
        let h = self.norm1.forward(x.clone());
        let attended = self
            .attention
            .forward(MhaInput::self_attn(h).mask_attn(mask))
            .context;
        let x = x + attended;
        let h = self.down.forward(
            self.gelu
                .forward(self.up.forward(self.norm2.forward(x.clone()))),
        );
        x + h
    }
}

#[derive(Module, Debug)]
pub struct CharTransformer {
    tokens: Embedding,
    positions: Embedding,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
    context: usize,
}

impl CharTransformer {
    pub fn new(
        vocab: usize,
        context: usize,
        d_model: usize,
        heads: usize,
        layers: usize,
        device: &Device,
    ) -> CharTransformer {
        CharTransformer {
            tokens: EmbeddingConfig::new(vocab, d_model).init(device),
            positions: EmbeddingConfig::new(context, d_model).init(device),
            blocks: (0..layers)
                .map(|_| Block::new(d_model, heads, device))
                .collect(),
            norm: LayerNormConfig::new(d_model).init(device),
            head: LinearConfig::new(d_model, vocab).init(device),
            context,
        }
    }

    /// Logits `[batch * seq, vocab]` for token ids `[batch, seq]`; `stages` cuts after the
    /// embeddings and after every block.
    pub fn forward(&self, ids: Tensor<2, Int>, stages: &mut Stages) -> Tensor<2> {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let pos: Vec<i64> = (0..batch).flat_map(|_| 0..seq as i64).collect();
        let pos = Tensor::<2, Int>::from_data(TensorData::new(pos, [batch, seq]), &device);
        let mut x = stages.cut(self.tokens.forward(ids) + self.positions.forward(pos));
        for block in &self.blocks {
            x = stages.cut(block.forward(x));
        }
        let d = x.dims()[2];
        let x: Tensor<2> = self.norm.forward(x).reshape([batch * seq, d]);
        self.head.forward(x)
    }

    pub fn context(&self) -> usize {
        self.context
    }
}

impl Objective<(Tensor<2, Int>, Tensor<1, Int>)> for CharTransformer {
    /// Each window's loss is the mean over its characters, so the loss reads per character.
    fn loss_sum(&self, batch: &(Tensor<2, Int>, Tensor<1, Int>), stages: &mut Stages) -> Tensor<1> {
        let logits = self.forward(batch.0.clone(), stages);
        cross_entropy_sum(logits, batch.1.clone()) / self.context as f32
    }
}
