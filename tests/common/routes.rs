//! The route table of tests/e2e.rs (the daemon) and tests/hostile.rs (the pipeline in process):
//! one route per envelope requirement, and one for registered senders only.

pub const ENVELOPE_ROUTES: &str = r#"
[[routes]]
name = "auth"
topics = ["auth/+/t"]
measurement = "auth"
topic_tags = "auth/+device/t"
[[routes]]
name = "signed"
topics = ["signed/+/t"]
require = "signed"
measurement = "signed"
[[routes]]
name = "authcrypt"
topics = ["ac/+/t"]
require = "authcrypt"
measurement = "ac"
[[routes]]
name = "any"
topics = ["open/#"]
require = "any"
measurement = "open"
[[routes]]
name = "registry"
topics = ["reg/+/t"]
senders = "registry"
measurement = "reg"
"#;
