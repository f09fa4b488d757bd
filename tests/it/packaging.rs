//! Handoff as an operator installs it (README: Deploying): the Debian package built with
//! cargo-deb, installed into a throwaway Debian root and run there as its own user; the systemd
//! unit rated by `systemd-analyze`; the container image's runtime stage built with podman on a
//! local Debian base and run from its filesystem; and `deploy/compose.yaml`.
//!
//! No container runtime works on the test machines (README: Deploying, "What the tests do not
//! exercise"), so the built trees are run with `chroot --userspec`, as the user the unit or
//! image names. The Debian base is made once with debootstrap and cached in
//! [`CACHE`], keyed by the month, so a run pays the minute it takes at most once a month.
//!
//! The package is made from the binary this suite already built (`cargo deb --no-build`, with a
//! target folder of its own holding that binary), not from a release build: a cold release
//! build costs about 8 minutes on 2 cores, and what the test checks (the files, the maintainer
//! script, the user, the unit, the binary answering as that user) is the same either way.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use serde_yaml_ng::Value as Yaml;

/// Where the Debian base tree is kept between runs.
const CACHE: &str = "/var/cache/handoff-ci";

/// The base image made from that tree, tagged with the same month.
const BASE_IMAGE: &str = "localhost/handoff-ci-base";

/// The image the container test builds (removed again at its end).
const TEST_IMAGE: &str = "localhost/handoff-ci:packaging-test";

/// How long a started Handoff may take to say it is ready.
const START: Duration = Duration::from_secs(30);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// Runs a command to its end; its output, whatever the outcome.
fn output(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err} (scripts/test.sh installs it)"))
}

/// Runs a command that must succeed; its stdout.
fn run(command: &mut Command) -> String {
    let out = output(command);
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The settings the README's Configuration table lists: what "a setting Handoff knows" means
/// to an operator.
fn readme_settings() -> BTreeSet<String> {
    let readme = read(repo("README.md"));
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a Configuration section");
    let settings: BTreeSet<String> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `")?.split('`').next())
        .map(str::to_owned)
        .collect();
    assert!(
        settings.len() > 20 && settings.contains("HANDOFF_ADDR"),
        "{settings:?}"
    );
    settings
}

/// `VARIABLE=value` lines of a systemd environment file, comments and blank lines skipped.
fn env_file_values(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (var, value) = line.split_once('=').expect("VARIABLE=value");
            (var.to_owned(), value.to_owned())
        })
        .collect()
}

/// A port nothing listens on right now, for a process whose address must be given up front
/// (the image's `0.0.0.0:PORT`, which its health check reads).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// The month's Debian bookworm tree (minbase, with adduser for the package's post-install
/// step), made with debootstrap when this month has none; older months' trees are removed.
fn debian_base() -> PathBuf {
    static MAKING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = MAKING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = time::OffsetDateTime::now_utc();
    let month = format!("{}-{:02}", now.year(), u8::from(now.month()));
    let tree = Path::new(CACHE).join(format!("bookworm-{month}"));
    if tree.join(".complete").exists() {
        return tree;
    }
    std::fs::create_dir_all(CACHE).unwrap();
    for old in std::fs::read_dir(CACHE).unwrap().flatten() {
        if old.file_name().to_string_lossy().starts_with("bookworm-") {
            std::fs::remove_dir_all(old.path()).unwrap();
        }
    }
    let started = Instant::now();
    run(Command::new("debootstrap").args([
        "--variant=minbase",
        "--include=adduser",
        "bookworm",
        tree.to_str().unwrap(),
    ]));
    std::fs::write(tree.join(".complete"), "").unwrap();
    eprintln!("made {} in {:?}", tree.display(), started.elapsed());
    tree
}

/// The month's base image, imported from [`debian_base`] when podman has none (older months'
/// are removed).
fn base_image() -> String {
    let tree = debian_base();
    let month = tree.file_name().unwrap().to_string_lossy();
    let image = format!("{BASE_IMAGE}:{month}");
    static IMPORTING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = IMPORTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if output(Command::new("podman").args(["image", "exists", &image]))
        .status
        .success()
    {
        return image;
    }
    let tags = run(Command::new("podman").args([
        "images",
        "--format={{.Repository}}:{{.Tag}}",
        BASE_IMAGE,
    ]));
    for old in tags.lines().filter(|tag| tag.starts_with(BASE_IMAGE)) {
        run(Command::new("podman").args(["image", "rm", old]));
    }
    run(Command::new("sh").arg("-c").arg(format!(
        "tar -C '{}' --exclude=./.complete -c . | podman import - '{image}'",
        tree.display()
    )));
    image
}

/// A copy of the base tree to install into or run in, removed with the folder it is in.
fn throwaway_root(from: &Path, into: &Path) -> PathBuf {
    let root = into.join("root");
    run(Command::new("cp").arg("-a").arg(from).arg(&root));
    root
}

/// A process killed when the test ends, whatever the outcome; its stderr kept in a file.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(command: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        Self { child, log }
    }

    fn log(&self) -> String {
        read(&self.log)
    }

    /// SIGTERM, then the exit status within `within`.
    fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        run(Command::new("kill").args(["-TERM", &pid]));
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "still running {within:?} after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a job with the token, completes it, and reads it back complete: the job runner's
/// path through a running instance.
async fn create_and_complete_a_job(base: &str, token: &str) {
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{base}/api/jobs"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let completed = client
        .post(format!("{base}/api/jobs/{id}/complete"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(completed.status(), 200);
    let job: Value = client
        .get(format!("{base}/api/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "complete", "{job}");
}

/// A user's numeric id and group id in a root's /etc/passwd.
fn passwd_entry(root: &Path, user: &str) -> Vec<String> {
    read(root.join("etc/passwd"))
        .lines()
        .map(|line| line.split(':').map(str::to_owned).collect::<Vec<_>>())
        .find(|fields| fields[0] == user)
        .unwrap_or_else(|| panic!("no user {user} in {}/etc/passwd", root.display()))
}

fn token_lines(env_file: &str) -> Vec<String> {
    env_file_values(env_file)
        .into_iter()
        .filter(|(var, _)| var == "HANDOFF_API_TOKEN")
        .map(|(_, token)| token)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs cargo-deb, podman, debootstrap: run by scripts/test.sh"]
async fn the_debian_package_installs_a_service_that_runs_as_its_own_user_and_completes_a_job() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();

    // The package, from the binary this suite built (see the module's comment).
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_handoff"),
        target.join("release/handoff"),
    )
    .unwrap();
    let deb = dir.path().join("handoff.deb");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(repo(""))
            .env("CARGO_TARGET_DIR", &target)
            .args(["deb", "--no-build", "--locked", "--fast", "--output"])
            .arg(&deb),
    );
    eprintln!("built the package at {:?}", started.elapsed());

    // Its files, their modes, and its one conffile.
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let files: Vec<(&str, &str)> = listing
        .lines()
        .filter(|line| !line.starts_with('d'))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields[0], fields[fields.len() - 1])
        })
        .collect();
    assert_eq!(
        files,
        [
            ("-rw-r-----", "./etc/handoff/handoff.env"),
            ("-rw-r--r--", "./usr/share/doc/handoff/README.md"),
            ("-rw-r--r--", "./usr/share/doc/handoff/copyright"),
            ("-rw-r--r--", "./usr/lib/systemd/system/handoff.service"),
            ("-rwxr-xr-x", "./usr/bin/handoff"),
        ],
        "{listing}"
    );
    let control = dir.path().join("control");
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(&control));
    assert_eq!(
        read(control.join("conffiles")),
        "/etc/handoff/handoff.env\n"
    );
    let fields = read(control.join("control"));
    let depends = fields
        .lines()
        .find_map(|line| line.strip_prefix("Depends: "))
        .expect("Depends");
    assert!(
        depends.contains("adduser") && depends.contains("libc6"),
        "{depends}"
    );

    // Installed into a copy of a Debian root with its own dpkg database: the maintainer scripts
    // run inside it (chroot), so they create the user and write the token there and nowhere
    // else. No systemd runs in it, so the post-install step enables the unit but starts nothing.
    let root = throwaway_root(&debian_base(), dir.path());
    std::fs::copy(&deb, root.join("tmp/handoff.deb")).unwrap();
    run(Command::new("chroot")
        .arg(&root)
        .args(["dpkg", "--install", "/tmp/handoff.deb"]));
    eprintln!("installed it at {:?}", started.elapsed());
    assert_eq!(
        read(root.join("usr/lib/systemd/system/handoff.service")),
        read(repo("deploy/systemd/handoff.service"))
    );
    assert!(
        root.join("etc/systemd/system/multi-user.target.wants/handoff.service")
            .is_symlink()
    );

    // The service's system user and group, its state folder, and the env file's owner.
    let user = passwd_entry(&root, "handoff");
    let (uid, gid): (u32, u32) = (user[2].parse().unwrap(), user[3].parse().unwrap());
    assert!(uid < 1000, "a system user: {user:?}");
    assert_eq!(user[5], "/var/lib/handoff");
    assert_eq!(user[6], "/usr/sbin/nologin");
    let state = std::fs::metadata(root.join("var/lib/handoff")).unwrap();
    assert_eq!((state.uid(), state.gid()), (uid, gid));
    assert_eq!(state.permissions().mode() & 0o777, 0o750);
    let env_path = root.join("etc/handoff/handoff.env");
    let env = std::fs::metadata(&env_path).unwrap();
    assert_eq!((env.uid(), env.gid()), (0, gid));
    assert_eq!(env.permissions().mode() & 0o777, 0o640);

    // A strong token, written once: installing again (an upgrade) keeps it.
    let tokens = token_lines(&read(&env_path));
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    let token = tokens[0].clone();
    assert!(token.len() >= 43, "256 bits, URL-safe: {token}");
    run(Command::new("chroot")
        .arg(&root)
        .args(["dpkg", "--install", "/tmp/handoff.deb"]));
    assert_eq!(token_lines(&read(&env_path)), std::slice::from_ref(&token));

    // The installed unit, with the installed binary in place, verifies clean. The root has no
    // systemd of its own; the units the service is ordered after are the verifying host's.
    run(Command::new("cp")
        .args(["-rn", "/usr/lib/systemd/system/."])
        .arg(root.join("usr/lib/systemd/system")));
    let verify = output(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg("handoff.service"),
    );
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // What the unit runs, as the unit runs it: as handoff, with exactly the env file's settings
    // (and a free port instead of 8080), `check-config` first, then `serve` with NOTIFY_SOCKET.
    let mut settings = env_file_values(&read(&env_path));
    let port = free_port();
    settings.push(("HANDOFF_ADDR".into(), format!("127.0.0.1:{port}")));
    let as_handoff = |args: &[&str]| {
        let mut command = Command::new("/usr/sbin/chroot");
        command
            .arg("--userspec=handoff:handoff")
            .arg(&root)
            .arg("/usr/bin/handoff")
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(settings.iter().map(|(var, value)| (var, value)));
        command
    };
    let checked = run(&mut as_handoff(&["check-config"]));
    assert!(
        checked.contains("sqlite:///var/lib/handoff/handoff.db") && !checked.contains(&token),
        "{checked}"
    );
    let notify = UnixDatagram::bind(root.join("run/handoff-notify")).unwrap();
    std::fs::set_permissions(
        root.join("run/handoff-notify"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    notify.set_read_timeout(Some(START)).unwrap();
    let mut server = Process::spawn(
        as_handoff(&["serve"]).env("NOTIFY_SOCKET", "/run/handoff-notify"),
        dir.path().join("serve.log"),
    );
    let mut message = [0u8; 256];
    let ready = notify
        .recv(&mut message)
        .unwrap_or_else(|err| panic!("no READY=1 within {START:?} ({err}):\n{}", server.log()));
    assert_eq!(message[..ready].trim_ascii(), b"READY=1");
    let base = format!("http://127.0.0.1:{port}");
    create_and_complete_a_job(&base, &token).await;
    let health = run(&mut as_handoff(&["health", "--url", &base]));
    assert!(health.starts_with("ok"), "{health}");
    let db = std::fs::metadata(root.join("var/lib/handoff/handoff.db")).unwrap();
    assert_eq!(db.uid(), uid, "the database is the service's");

    let stopped = server.terminate(Duration::from_secs(10));
    assert!(stopped.success(), "{stopped}:\n{}", server.log());
    let stopping = notify.recv(&mut message).unwrap();
    assert_eq!(message[..stopping].trim_ascii(), b"STOPPING=1");
    let unhealthy = output(&mut as_handoff(&["health", "--url", &base]));
    assert_eq!(unhealthy.status.code(), Some(1));
    eprintln!("done at {:?}", started.elapsed());
}

/// The score the README gives, e.g. "rates it **1.2 OK**".
fn readme_security_score() -> f64 {
    let readme = read(repo("README.md"));
    let rest = readme
        .split(
            "`systemd-analyze security --offline=true deploy/systemd/handoff.service` rates it **",
        )
        .nth(1)
        .expect("README states the unit's security score");
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
#[ignore = "needs systemd-analyze (systemd): run by scripts/test.sh"]
fn the_unit_rates_ok_in_systemd_analyze_security_as_the_readme_says() {
    let report = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(repo("deploy/systemd/handoff.service")));
    let score: f64 = report
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for handoff.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .expect("an overall exposure level")
        .parse()
        .unwrap();
    assert!(score <= 2.0, "rated {score}:\n{report}");
    assert_eq!(score, readme_security_score(), "README's score is stale");
    let unit = read(repo("deploy/systemd/handoff.service"));
    for line in [
        "Type=notify",
        "ExecStartPre=/usr/bin/handoff check-config",
        "Restart=on-failure",
        "User=handoff",
        "EnvironmentFile=/etc/handoff/handoff.env",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs cargo-deb, podman, debootstrap: run by scripts/test.sh"]
async fn the_images_runtime_stage_runs_as_a_numeric_user_answers_its_health_check_and_completes_a_job()
 {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let base_image = base_image();
    eprintln!("base image ready at {:?}", started.elapsed());

    // The `build` stage's output, given as a build context of that name: podman then builds only
    // the runtime stage, as the Containerfile has it, on the local base.
    let stage = dir.path().join("build-stage");
    std::fs::create_dir_all(stage.join("out/state")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_handoff"), stage.join("out/handoff")).unwrap();
    let empty_context = dir.path().join("context");
    std::fs::create_dir_all(&empty_context).unwrap();
    run(Command::new("podman")
        .args([
            "build",
            "--pull=never",
            "--force-rm",
            "--format=docker",
            "--target=runtime",
        ])
        .arg(format!("--build-arg=RUNTIME_BASE={base_image}"))
        .arg(format!("--build-context=build={}", stage.display()))
        .arg(format!("--tag={TEST_IMAGE}"))
        .arg("--file")
        .arg(repo("Containerfile"))
        .arg(&empty_context));
    eprintln!("built the runtime stage at {:?}", started.elapsed());
    let _remove = RemoveImage;

    let inspected: Value = serde_json::from_str(&run(
        Command::new("podman").args(["image", "inspect", TEST_IMAGE])
    ))
    .unwrap();
    let image = &inspected[0];
    let config = &image["Config"];
    assert_eq!(config["User"], "65532:65532");
    let env: Vec<(String, String)> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            let (var, value) = pair.as_str().unwrap().split_once('=').unwrap();
            (var.to_owned(), value.to_owned())
        })
        .collect();
    assert!(env.contains(&("HANDOFF_ADDR".into(), "0.0.0.0:8080".into())));
    assert!(config["ExposedPorts"].get("8080/tcp").is_some(), "{config}");
    assert!(
        config["Volumes"].get("/var/lib/handoff").is_some(),
        "{config}"
    );
    assert_eq!(config["Entrypoint"], json!(["/usr/local/bin/handoff"]));
    assert_eq!(config["Cmd"], json!(["serve"]));
    let check = &image["Healthcheck"]["Test"];
    assert_eq!(check, &json!(["CMD", "/usr/local/bin/handoff", "health"]));
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.title"], "handoff");
    assert_eq!(labels["org.opencontainers.image.licenses"], "MIT");
    let base_size =
        run(Command::new("podman").args(["image", "inspect", "--format={{.Size}}", &base_image]));
    eprintln!(
        "image size {} bytes, of which the base {}",
        image["Size"],
        base_size.trim()
    );

    // Its filesystem, run as the image's user with the image's environment (and a free port,
    // on 0.0.0.0 as in the image): podman's mount is read-only, so a copy.
    let mounted = run(Command::new("podman").args(["image", "mount", TEST_IMAGE]));
    let rootfs = dir.path().join("rootfs");
    let copied = output(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", mounted.trim()))
            .arg(&rootfs),
    );
    run(Command::new("podman").args(["image", "unmount", TEST_IMAGE]));
    assert!(copied.status.success(), "{copied:?}");
    let state = std::fs::metadata(rootfs.join("var/lib/handoff")).unwrap();
    assert_eq!((state.uid(), state.gid()), (65532, 65532));

    let port = free_port();
    let token = "image-test-token-0123456789";
    let in_image = |args: &[&str]| {
        let mut command = Command::new("/usr/sbin/chroot");
        command
            .arg("--userspec=65532:65532")
            .arg("--groups=65532")
            .arg(&rootfs)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(var, value)| (var, value)))
            .env("HANDOFF_ADDR", format!("0.0.0.0:{port}"))
            .env("HANDOFF_API_TOKEN", token);
        command
    };
    let health_check: Vec<&str> = check.as_array().unwrap()[1..]
        .iter()
        .map(|arg| arg.as_str().unwrap())
        .collect();
    let before = output(&mut in_image(&health_check));
    assert_eq!(before.status.code(), Some(1), "unhealthy before it starts");

    let mut entrypoint: Vec<&str> = vec![config["Entrypoint"][0].as_str().unwrap()];
    entrypoint.push(config["Cmd"][0].as_str().unwrap());
    let mut server = Process::spawn(&mut in_image(&entrypoint), dir.path().join("serve.log"));
    let waiting = Instant::now();
    while !output(&mut in_image(&health_check)).status.success() {
        assert!(
            waiting.elapsed() < START,
            "the health check never passed:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    create_and_complete_a_job(&format!("http://127.0.0.1:{port}"), token).await;
    let db = std::fs::metadata(rootfs.join("var/lib/handoff/handoff.db")).unwrap();
    assert_eq!(db.uid(), 65532);
    let stopped = server.terminate(Duration::from_secs(10));
    assert!(stopped.success(), "{stopped}:\n{}", server.log());
    eprintln!("done at {:?}", started.elapsed());
}

/// Removes the test image at the end of the test, passed or not.
struct RemoveImage;

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["image", "rm", "--force", TEST_IMAGE])
            .output();
    }
}

/// Names under `key` of a compose service: a list of names, or a map keyed by them.
fn names(service: &Yaml, key: &str) -> Vec<String> {
    match service.get(key) {
        None => Vec::new(),
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .expect("a name")
                    .split(':')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect(),
        Some(Yaml::Mapping(map)) => map
            .keys()
            .map(|key| key.as_str().expect("a name").to_owned())
            .collect(),
        Some(other) => panic!("{key}: {other:?}"),
    }
}

/// The variables a compose service sets: from a map or from a list of `VAR=value`.
fn compose_env(service: &Yaml) -> BTreeSet<String> {
    match service.get("environment") {
        None => BTreeSet::new(),
        Some(Yaml::Mapping(map)) => map
            .keys()
            .map(|key| key.as_str().unwrap().to_owned())
            .collect(),
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(|item| item.as_str().unwrap().split('=').next().unwrap().to_owned())
            .collect(),
        Some(other) => panic!("environment: {other:?}"),
    }
}

#[test]
fn the_compose_file_sets_only_handoff_settings_and_names_only_services_it_defines() {
    let mut compose: Yaml = serde_yaml_ng::from_str(&read(repo("deploy/compose.yaml"))).unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().expect("services");
    let defined: BTreeSet<String> = services
        .keys()
        .map(|name| name.as_str().unwrap().to_owned())
        .collect();
    let networks: BTreeSet<String> = names(&compose, "networks").into_iter().collect();
    let known = readme_settings();

    let mut instances = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        for named in names(service, "depends_on")
            .into_iter()
            .chain(names(service, "links"))
        {
            assert!(
                defined.contains(&named),
                "{name} names {named}, not a service here"
            );
        }
        for network in names(service, "networks") {
            assert!(networks.contains(&network), "{name}: no network {network}");
        }
        assert!(
            service.get("healthcheck").is_some(),
            "{name} has no health check"
        );
        if service.get("build").is_none() {
            continue;
        }
        instances += 1;
        assert_eq!(service["build"]["dockerfile"], "Containerfile", "{name}");
        let set = compose_env(service);
        let unknown: Vec<&String> = set.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{name} sets {unknown:?}, not in README's settings"
        );
        for needed in [
            "DATABASE_URL",
            "REDIS_URL",
            "HANDOFF_FANOUT_KEY",
            "HANDOFF_TRUSTED_PROXIES",
            "HANDOFF_PUBLIC_URL",
        ] {
            assert!(set.contains(needed), "{name} lacks {needed} for scale-out");
        }
        let env = &service["environment"];
        assert!(
            env["DATABASE_URL"]
                .as_str()
                .unwrap()
                .starts_with("postgres://")
        );
        assert!(env["REDIS_URL"].as_str().unwrap().starts_with("redis://"));
    }
    assert!(instances >= 2, "{instances} Handoff instances");
    for needed in ["postgres", "redis", "nginx"] {
        assert!(defined.contains(needed), "no {needed} service");
    }

    // nginx runs the repository's nginx.conf, rewriting only its one upstream line.
    let nginx = &services["nginx"];
    let volumes: Vec<&str> = nginx["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|volume| volume.as_str().unwrap())
        .collect();
    assert!(
        volumes.contains(&"../nginx.conf:/etc/handoff/nginx.conf:ro"),
        "{volumes:?}"
    );
    let command = nginx["command"][2].as_str().unwrap();
    let upstream = "server 127.0.0.1:8080 ";
    assert!(command.contains(upstream), "{command}");
    assert_eq!(read(repo("nginx.conf")).matches(upstream).count(), 1);
    let proxy_address = nginx["networks"]["handoff"]["ipv4_address"]
        .as_str()
        .unwrap();
    for (name, service) in services {
        if service.get("build").is_some() {
            assert_eq!(
                service["environment"]["HANDOFF_TRUSTED_PROXIES"], proxy_address,
                "{name:?} trusts nginx's address"
            );
        }
    }
}

#[test]
fn the_packages_env_file_lists_every_setting_and_sets_only_known_ones() {
    let text = read(repo("deploy/debian/handoff.env"));
    let listed: BTreeSet<String> = text
        .lines()
        .filter_map(|line| {
            let line = line.strip_prefix('#').unwrap_or(line);
            let (var, _) = line.split_once('=')?;
            let is_name = !var.is_empty()
                && var
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            is_name.then(|| var.to_owned())
        })
        .collect();
    let known = readme_settings();
    let missing: Vec<&String> = known.difference(&listed).collect();
    assert!(missing.is_empty(), "handoff.env does not list {missing:?}");
    let unknown: Vec<&String> = listed.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "handoff.env lists {unknown:?}, unknown to the README"
    );
    // The package sets only where the database lives and the demo off; the token is written at
    // installation.
    let set: Vec<String> = env_file_values(&text)
        .into_iter()
        .map(|(var, _)| var)
        .collect();
    assert_eq!(set, ["DATABASE_URL", "HANDOFF_DEMO"]);
}

#[test]
fn handoff_token_prints_a_new_strong_token_each_time_that_start_up_accepts() {
    let token = || run(Command::new(env!("CARGO_BIN_EXE_handoff")).arg("token"));
    let (first, second) = (token(), token());
    assert_ne!(first, second);
    let first = first.trim_end();
    assert_eq!(first.len(), 43, "256 bits in URL-safe base64: {first}");
    assert!(
        first
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{first}"
    );
    run(Command::new(env!("CARGO_BIN_EXE_handoff"))
        .arg("check-config")
        .env("HANDOFF_API_TOKEN", first));
}
