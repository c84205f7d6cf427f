//! The sampling parameters, declared once for every request type that carries them.
//!
//! The engine request ([`crate::engine::GenerateRequest`]) and the native task request
//! ([`crate::task::TaskRequest`]) keep these fields at the top level of their JSON, next to
//! their own, and refuse unknown fields. serde's `flatten` would make that one nested field,
//! but it cannot deny unknown fields and loses the field path of a type error (`seed: expected
//! u32` would name no field), so the fields are spliced in by [`sampling_fields!`] instead:
//! written once here, they become each request's own fields, its [`Sampling`] getter
//! (`sampling()`) and its setter (`with_sampling()`), and the [`Sampling`] type itself. A front
//! end of another dialect (OpenAI's `/v1`) decodes its own shape and maps it to a
//! [`Sampling`] once.

/// Calls `$callback! { $args ; <the sampling fields> }`: the one list of the sampling fields,
/// with their documentation and serde attributes, in their wire order.
macro_rules! sampling_fields {
    ($callback:ident ! { $($args:tt)* }) => {
        $callback! {
            $($args)* ;
            /// 0 means greedy decoding.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            temperature: Option<f32>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            top_p: Option<f32>,
            /// 0 disables top-k.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            top_k: Option<i32>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            min_p: Option<f32>,
            /// 1.0 disables the penalty.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            repeat_penalty: Option<f32>,
            /// Locally typical sampling; 1.0 disables it.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            typical_p: Option<f32>,
            /// Tokens the penalties look back over: 0 disables them, -1 is the slot's whole
            /// context.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            repeat_last_n: Option<i32>,
            /// Subtracted once from every token already present (OpenAI's meaning), -2 to 2.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            presence_penalty: Option<f32>,
            /// Subtracted per occurrence of a token already present, -2 to 2.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            frequency_penalty: Option<f32>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            seed: Option<u32>,
            /// Generation ends before the first occurrence of any of these; the stop string
            /// itself is never sent.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            stop: Vec<String>,
            /// Keep generating past the model's end-of-generation token, up to `max_tokens` (for
            /// benchmarks that need a fixed length).
            #[serde(default, skip_serializing_if = "std::ops::Not::not")]
            ignore_eos: bool,
        }
    };
}
pub(crate) use sampling_fields;

/// Declares a request struct whose fields are `{ before }`, the sampling fields, then
/// `{ after }`, with `sampling()` and `with_sampling()`. Called through [`sampling_fields!`].
macro_rules! sampling_request {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $($before:tt)* } { $($after:tt)* } ;
        $( $(#[$field_meta:meta])* $field:ident : $ty:ty ),* $(,)?
    ) => {
        $(#[$meta])*
        pub struct $name {
            $($before)*
            $( $(#[$field_meta])* pub $field: $ty, )*
            $($after)*
        }

        impl $name {
            /// This request's sampling parameters.
            #[allow(clippy::clone_on_copy)]
            pub fn sampling(&self) -> $crate::sampling::Sampling {
                $crate::sampling::Sampling {
                    $( $field: self.$field.clone(), )*
                }
            }

            /// This request with `sampling`'s parameters in place of its own.
            pub fn with_sampling(self, sampling: $crate::sampling::Sampling) -> Self {
                Self {
                    $( $field: sampling.$field, )*
                    ..self
                }
            }
        }
    };
}
pub(crate) use sampling_request;

macro_rules! sampling_struct {
    ( ; $( $(#[$field_meta:meta])* $field:ident : $ty:ty ),* $(,)? ) => {
        /// The sampling parameters of one request, as the client gave them (`None`: the
        /// engine's default, `crate::engine::defaults`).
        #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Sampling {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }
    };
}

sampling_fields!(sampling_struct! {});

#[cfg(test)]
mod tests {
    use super::Sampling;
    use crate::engine::GenerateRequest;
    use crate::task::TaskRequest;

    fn some() -> Sampling {
        Sampling {
            temperature: Some(0.5),
            top_p: Some(0.9),
            top_k: Some(7),
            min_p: Some(0.1),
            repeat_penalty: Some(1.1),
            typical_p: Some(0.8),
            repeat_last_n: Some(-1),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.5),
            seed: Some(42),
            stop: vec!["\n".into()],
            ignore_eos: true,
        }
    }

    #[test]
    fn every_request_carries_the_same_sampling_at_its_top_level() {
        let engine = GenerateRequest::prompt("hi").with_sampling(some());
        assert_eq!(engine.sampling(), some());
        assert_eq!(engine.prompt.as_deref(), Some("hi"), "its own fields stay");
        let task = TaskRequest {
            model_ref: "m".into(),
            ..TaskRequest::default()
        }
        .with_sampling(engine.sampling());
        assert_eq!(task.sampling(), some());
        // On the wire the fields are the request's own, named as before.
        let json = serde_json::to_value(&engine).unwrap();
        assert_eq!(json["seed"], 42);
        assert_eq!(json["repeat_last_n"], -1);
        assert_eq!(json["stop"], serde_json::json!(["\n"]));
        let back: GenerateRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back, engine);
    }
}
