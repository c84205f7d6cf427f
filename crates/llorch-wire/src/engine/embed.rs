//! Embedding requests: a [`super::GenerateRequest`] whose `embed` holds the inputs asks the
//! engine for one vector per input instead of text. The answer is one `end` event whose
//! `embeddings` hold the vectors (L2-normalised, in input order) and whose `prompt_tokens` is
//! the tokens read. Nothing is decoded and no slot is taken; the pool must serve embeddings
//! (its `embeddings` setting).

use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;

/// Inputs one request may embed (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

/// One input: text, tokenized by the engine (with the model's special tokens), or token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbedInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// The checks that need no model: an embedding request has nothing of a generation, and
/// between 1 and [`MAX_EMBED_INPUTS`] inputs, none empty. `field` names the inputs as the
/// caller's surface does (`input`).
pub(super) fn validate(
    req: &super::GenerateRequest,
    inputs: &[EmbedInput],
) -> Result<(), ErrorBody> {
    let generation = [
        ("prompt", req.prompt.is_some()),
        ("messages", req.messages.is_some()),
        ("tools", !req.tools.is_empty()),
        ("json_schema", req.json_schema.is_some()),
        ("grammar", req.grammar.is_some()),
        ("n", req.n.is_some()),
        ("logprobs", req.logprobs.is_some()),
        ("count_only", req.count_only),
    ];
    if let Some((field, _)) = generation.iter().find(|(_, given)| *given) {
        return Err(ErrorBody::invalid(
            *field,
            format!("{field} does not go with embed: an embedding request has only its inputs"),
        ));
    }
    if inputs.is_empty() || inputs.len() > MAX_EMBED_INPUTS {
        return Err(ErrorBody::invalid(
            "input",
            format!(
                "input holds {} items; give 1 to {MAX_EMBED_INPUTS}",
                inputs.len()
            ),
        ));
    }
    for (i, input) in inputs.iter().enumerate() {
        let empty = match input {
            EmbedInput::Text(t) => {
                if t.contains('\0') {
                    return Err(ErrorBody::invalid(
                        format!("input[{i}]"),
                        format!("input[{i}] must not contain NUL characters"),
                    ));
                }
                t.is_empty()
            }
            EmbedInput::Tokens(t) => t.is_empty(),
        };
        if empty {
            return Err(ErrorBody::invalid(
                format!("input[{i}]"),
                format!("input[{i}] is empty; every input needs at least one token"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::GenerateRequest;
    use super::*;

    fn embed(inputs: Vec<EmbedInput>) -> GenerateRequest {
        GenerateRequest {
            embed: Some(inputs),
            ..GenerateRequest::default()
        }
    }

    #[test]
    fn an_embedding_request_has_only_its_inputs() {
        assert!(embed(vec![
            EmbedInput::Text("a".into()),
            EmbedInput::Tokens(vec![1, 2])
        ])
        .validate()
        .is_ok());
        let field = |r: GenerateRequest| r.validate().unwrap_err().field.unwrap();
        assert_eq!(field(embed(vec![])), "input");
        assert_eq!(
            field(embed(vec![EmbedInput::Text(String::new())])),
            "input[0]"
        );
        assert_eq!(
            field(embed(vec![
                EmbedInput::Text("a".into()),
                EmbedInput::Tokens(vec![])
            ])),
            "input[1]"
        );
        let mut r = embed(vec![EmbedInput::Text("a".into())]);
        r.prompt = Some("b".into());
        assert_eq!(field(r), "prompt");
        assert_eq!(
            field(embed(vec![
                EmbedInput::Text("a".into());
                MAX_EMBED_INPUTS + 1
            ])),
            "input"
        );
        // Strings and token arrays, as OpenAI's `input` takes them.
        let r: GenerateRequest =
            serde_json::from_str(r#"{"embed": ["one", [1, 2, 3]], "embed_truncate": true}"#)
                .unwrap();
        assert_eq!(
            r.embed.unwrap(),
            [
                EmbedInput::Text("one".into()),
                EmbedInput::Tokens(vec![1, 2, 3])
            ]
        );
        assert!(r.embed_truncate);
    }
}
