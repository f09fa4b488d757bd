//! One setting's declaration, the `settings!` macro that declares a struct of them, and what is
//! derived from the declarations: the environment reader, README's settings table and the
//! commented env file (`handoff check-config --markdown`, `--env-file`).

use super::ConfigError;
use super::kinds::Kind;

/// One environment variable, as the README documents it. Declared by `settings!` beside the
/// field it fills, so its name, default and meaning exist once.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub var: &'static str,
    /// The text read when the variable is unset (or empty); `None` when unset means "none".
    pub default: Option<&'static str>,
    /// Beside a default, a gloss (`30 min`); without one, what unset means (`one per core`).
    pub note: &'static str,
    /// What it does, in Markdown: the field's doc comment, one line per element.
    pub meaning: &'static [&'static str],
}

impl Setting {
    /// The meaning as one line of Markdown.
    pub fn meaning(&self) -> String {
        let lines: Vec<&str> = self.meaning.iter().map(|line| line.trim()).collect();
        lines.join(" ")
    }

    /// README's "default" column.
    pub fn default_column(&self) -> String {
        match (self.default, self.note) {
            (Some(""), _) => "empty".into(),
            (Some(value), "") => format!("`{value}`"),
            (Some(value), note) => format!("`{value}` ({note})"),
            (None, note) => note.into(),
        }
    }

    /// How `check-config` shows this setting when it is unset and has no default.
    pub fn unset(&self) -> String {
        match plain(self.note) {
            note if note == "unset" => note,
            note => format!("unset: {note}"),
        }
    }

    fn markdown_row(&self) -> String {
        format!(
            "| `{}` | {} | {} |",
            self.var,
            self.default_column(),
            self.meaning()
        )
    }

    /// README's row as comments, then the variable at its default, commented out.
    fn env_entry(&self) -> String {
        let mut entry = wrap(&format!("{}: {}", self.var, self.meaning()));
        entry.push_str(&format!("# Default: {}\n", self.default_column()));
        entry.push_str(&format!("#{}={}\n", self.var, self.default.unwrap_or("")));
        entry
    }
}

/// README's settings table, header included: every setting's name, default and meaning.
pub fn markdown_table<'a>(settings: impl IntoIterator<Item = &'a Setting>) -> String {
    let mut table = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for setting in settings {
        table.push_str(&setting.markdown_row());
        table.push('\n');
    }
    table
}

/// An env file (systemd's `EnvironmentFile=`, Debian's `/etc/handoff/handoff.env`) that names
/// every setting, commented out at its default, under README's default and meaning (Markdown).
pub fn env_file<'a>(settings: impl IntoIterator<Item = &'a Setting>) -> String {
    let mut file = String::from(
        "# Handoff's settings (README.md, \"Configuration\"), as printed by\n\
         # `handoff check-config --env-file`. Each is commented out at its default: remove the\n\
         # leading `#` to set one. An empty value counts as unset.\n",
    );
    for setting in settings {
        file.push('\n');
        file.push_str(&setting.env_entry());
    }
    file
}

/// Markdown as plain text: without the backticks and the bold.
fn plain(markdown: &str) -> String {
    markdown.replace("**", "").replace('`', "")
}

/// `text` as `# ` comment lines of at most 100 characters where the words allow.
fn wrap(text: &str) -> String {
    const WIDTH: usize = 100;
    let mut out = String::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// The environment as settings read it: an empty variable counts as unset.
pub struct Env<'a>(pub &'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn get(&self, setting: &Setting) -> Option<String> {
        (self.0)(setting.var).filter(|value| !value.is_empty())
    }

    fn parse<T>(
        &self,
        setting: &Setting,
        kind: &impl Kind<T>,
        raw: &str,
    ) -> Result<T, ConfigError> {
        kind.parse(raw).map_err(|reason| ConfigError {
            var: setting.var,
            value: kind.mask(raw),
            reason,
        })
    }

    /// The setting's value, from its text or else its default; `None` when it has neither.
    pub fn read<T>(
        &self,
        setting: &Setting,
        kind: &impl Kind<T>,
    ) -> Result<Option<T>, ConfigError> {
        let raw = self
            .get(setting)
            .or_else(|| setting.default.map(Into::into));
        raw.map(|raw| self.parse(setting, kind, &raw)).transpose()
    }

    /// The value of a setting that has a default or must be set; `missing` says why it must.
    pub fn need<T>(
        &self,
        s: &Setting,
        kind: &impl Kind<T>,
        missing: &str,
    ) -> Result<T, ConfigError> {
        self.read(s, kind)?.ok_or_else(|| ConfigError {
            var: s.var,
            value: String::new(),
            reason: missing.into(),
        })
    }

    /// Whether a group of settings is on: its switch is set. Without it every other setting of
    /// the group is refused, so that none is set in the belief that it does something.
    pub fn switched(&self, switch: &Setting, group: &[Setting]) -> Result<bool, ConfigError> {
        if self.get(switch).is_some() {
            return Ok(true);
        }
        match group.iter().find(|setting| self.get(setting).is_some()) {
            Some(setting) => Err(ConfigError {
                var: setting.var,
                value: "(not shown)".into(),
                reason: format!("it only applies with {}, which is not set", switch.var),
            }),
            None => Ok(false),
        }
    }
}

/// Declares a struct of settings. Each field names its variable, its [`Kind`] and one of
/// `default "value"` (optionally `, "gloss"`), `unset "what that means"` (the field is an
/// `Option`), or `required "README's default column", "why, when it is missing"`; its doc
/// comment is its meaning in README's table. A `group field: Type when SWITCH else "listing";`
/// at the end holds another such struct, read only when its `SWITCH` setting is set.
///
/// It makes the struct, one [`Setting`] constant per variable, `SETTINGS` (in order), `read`,
/// `settings` (`check-config`'s listing, secrets masked by their kinds) and a `Debug` that is
/// that listing.
macro_rules! settings {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                pub $field:ident: $ty:ty = $var:ident, $kind:expr, $how:ident $($text:literal),+;
            )*
            $(group $group:ident: $group_ty:ident when $switch:ident else $off:literal;)?
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
            $(
                #[doc = concat!("Read when `", stringify!($switch), "` is set.")]
                pub $group: Option<$group_ty>,
            )?
        }

        $(
            #[doc = concat!("`", stringify!($var), "`:")]
            $(#[doc = $doc])*
            pub const $var: $crate::config::setting::Setting = settings!(@setting $var, [$($doc),*], $how $($text),+);
        )*

        impl $name {
            /// Its settings in README's order.
            pub const SETTINGS: &[$crate::config::setting::Setting] = &[$($var),*];

            pub(crate) fn read(
                env: &$crate::config::setting::Env,
            ) -> Result<Self, $crate::config::ConfigError> {
                Ok(Self {
                    $( $field: settings!(@read env, $var, $kind, $how $($text),+), )*
                    $(
                        $group: if env.switched(&$switch, $group_ty::SETTINGS)? {
                            Some($group_ty::read(env)?)
                        } else {
                            None
                        },
                    )?
                })
            }

            /// Every setting as its variable and its effective value, in the variable's own
            /// units and with defaults filled in, for an operator to read
            /// (`handoff check-config`). Secrets are masked: tokens and keys entirely,
            /// passwords inside URLs.
            pub fn settings(&self) -> Vec<(&'static str, String)> {
                #[allow(unused_mut)]
                let mut settings = vec![
                    $( ($var.var, settings!(@show self.$field, $var, $kind, $how)), )*
                ];
                $(
                    match &self.$group {
                        Some(group) => settings.extend(group.settings()),
                        None => settings
                            .extend($group_ty::SETTINGS.iter().map(|s| (s.var, $off.into()))),
                    }
                )?
                settings
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_map().entries(self.settings()).finish()
            }
        }
    };

    (@setting $var:ident, [$($doc:literal),*], default $default:literal $(, $note:literal)?) => {
        $crate::config::setting::Setting {
            var: stringify!($var),
            default: Some($default),
            note: settings!(@note $($note)?),
            meaning: &[$($doc),*],
        }
    };
    (@setting $var:ident, [$($doc:literal),*], $how:ident $note:literal $(, $reason:literal)?) => {
        $crate::config::setting::Setting { var: stringify!($var), default: None, note: $note, meaning: &[$($doc),*] }
    };
    (@note) => { "" };
    (@note $note:literal) => { $note };

    (@read $env:ident, $var:ident, $kind:expr, default $default:literal $(, $note:literal)?) => {
        $env.need(&$var, &$kind, "")?
    };
    (@read $env:ident, $var:ident, $kind:expr, unset $note:literal) => {
        $env.read(&$var, &$kind)?
    };
    (@read $env:ident, $var:ident, $kind:expr, required $note:literal, $reason:literal) => {
        $env.need(&$var, &$kind, $reason)?
    };

    (@show $value:expr, $var:ident, $kind:expr, unset) => {
        match &$value {
            Some(value) => $crate::config::kinds::Kind::show(&$kind, value),
            None => $var.unset(),
        }
    };
    (@show $value:expr, $var:ident, $kind:expr, $how:ident) => {
        $crate::config::kinds::Kind::show(&$kind, &$value)
    };
}

pub(crate) use settings;
