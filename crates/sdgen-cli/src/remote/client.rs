//! A small blocking client of `sdgen-server`'s job API: submit (waiting out a full queue as the
//! server's `Retry-After` says), follow the event stream, fetch a job and its images, cancel.
//! The server's refusals become errors the CLI's exit codes already mean: the user's input
//! (`sdgen::Error`, exit 2; a field named as the flag that set it) or a failure (exit 1).

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use anyhow::{anyhow, Context};
use sdgen::engine::wire::{JobBody, JobEvent};
use serde::Deserialize;

/// How many times a full queue (503) is waited out before giving up.
const SUBMIT_ATTEMPTS: usize = 4;
/// The longest wait between attempts, whatever `Retry-After` says.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// A server, by its base URL (`http://host:port`, no trailing slash).
#[derive(Clone)]
pub struct Server {
    /// As the user gave it, for messages.
    pub url: String,
    key: Option<String>,
    agent: ureq::Agent,
}

/// A refusal's body, as the server writes every one (`{error, field, message, detail}`).
#[derive(Debug, Default, Deserialize)]
struct Refusal {
    #[serde(default)]
    error: String,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    message: String,
    #[serde(default)]
    template: Option<String>,
}

impl Server {
    /// The server at `url` (`http://` is assumed when no scheme is given).
    pub fn new(url: &str, key: Option<String>) -> Self {
        let url = url.trim().trim_end_matches('/');
        let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            // The event stream sends a keep-alive comment every 15 s however long a step takes.
            .timeout_read(Duration::from_secs(120))
            .build();
        Self { url, key, agent }
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.url));
        match &self.key {
            Some(k) => r.set("Authorization", &format!("Bearer {k}")),
            None => r,
        }
    }

    /// Sends `req`, turning a refusal or an unreachable server into the CLI's error.
    fn call(&self, req: ureq::Request, body: Option<&[u8]>) -> anyhow::Result<ureq::Response> {
        let sent = match body {
            Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
            None => req.call(),
        };
        match sent {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, r)) => Err(self.refusal(status, r)),
            Err(ureq::Error::Transport(t)) => Err(anyhow!("cannot reach the server at {}: {t}", self.url)),
        }
    }

    /// Queues `body`: the job's id. A full queue is retried after the server's `Retry-After` a
    /// few times before giving up.
    pub fn submit(&self, body: &JobBody) -> anyhow::Result<String> {
        let bytes = serde_json::to_vec(body).expect("plain data serializes");
        for attempt in 1..=SUBMIT_ATTEMPTS {
            let sent = self.request("POST", "/v1/jobs").set("Content-Type", "application/json").send_bytes(&bytes);
            let response = match sent {
                Err(ureq::Error::Status(503, r)) if attempt < SUBMIT_ATTEMPTS => {
                    let wait = r
                        .header("Retry-After")
                        .and_then(|s| s.trim().parse().ok())
                        .map_or(Duration::from_secs(5), Duration::from_secs)
                        .min(MAX_RETRY_WAIT);
                    let why = read_refusal(r).message;
                    crate::progress::warn(&format!(
                        "The server at {} is busy ({why}); trying again in {}s",
                        self.url,
                        wait.as_secs()
                    ));
                    std::thread::sleep(wait);
                    continue;
                }
                Err(ureq::Error::Status(503, r)) => {
                    let why = read_refusal(r).message;
                    return Err(anyhow!("the server at {} is busy: {why} (tried {SUBMIT_ATTEMPTS} times)", self.url));
                }
                Err(ureq::Error::Status(status, r)) => return Err(self.refusal(status, r)),
                Err(ureq::Error::Transport(t)) => return Err(anyhow!("cannot reach the server at {}: {t}", self.url)),
                Ok(r) => r,
            };
            let answer: serde_json::Value = serde_json::from_reader(response.into_reader())
                .with_context(|| format!("the server at {} answered the job with no JSON", self.url))?;
            return answer["id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("the server at {} answered the job with no id: {answer}", self.url));
        }
        unreachable!("the last attempt returns")
    }

    /// The job as `GET /v1/jobs/{id}` shows it.
    pub fn job(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        let r = self.call(self.request("GET", &format!("/v1/jobs/{id}")), None)?;
        serde_json::from_reader(r.into_reader()).with_context(|| format!("job {id} from {}", self.url))
    }

    /// Image `index`'s PNG file, as the server made it.
    pub fn image(&self, id: &str, index: usize) -> anyhow::Result<Vec<u8>> {
        let r = self.call(self.request("GET", &format!("/v1/jobs/{id}/images/{index}")), None)?;
        let mut png = Vec::new();
        r.into_reader()
            .read_to_end(&mut png)
            .with_context(|| format!("image {index} of job {id} from {}", self.url))?;
        Ok(png)
    }

    /// Asks the server to cancel the job (queued or running).
    pub fn cancel(&self, id: &str) -> anyhow::Result<()> {
        self.call(self.request("DELETE", &format!("/v1/jobs/{id}")), None).map(drop)
    }

    /// The job's events, from its first (a late subscriber gets them all) to its last.
    pub fn events(&self, id: &str) -> anyhow::Result<Events> {
        let req = self.request("GET", &format!("/v1/jobs/{id}/events")).set("Accept", "text/event-stream");
        let r = self.call(req, None)?;
        Ok(Events { reader: BufReader::new(r.into_reader()), url: self.url.clone() })
    }

    /// A refusal as the CLI's error: what the user can fix is an `sdgen::Error` (exit 2), with
    /// the field named as the flag that set it; the rest a failure (exit 1).
    fn refusal(&self, status: u16, response: ureq::Response) -> anyhow::Error {
        let r = read_refusal(response);
        let url = &self.url;
        let user = |m: String| anyhow::Error::new(sdgen::Error::InvalidInput(m));
        match status {
            401 if self.key.is_some() => {
                user(format!("the server at {url} refused the API key (--api-key or SDGEN_API_KEY): {}", r.message))
            }
            401 => user(format!("the server at {url} needs an API key: pass --api-key KEY or set SDGEN_API_KEY")),
            // The job's fields (422), its size (413), a body the server cannot take (400), and a
            // job too big for the server's memory (507, with the planner's numbers).
            400 | 413 | 422 | 507 => user(format!(
                "the server at {url} refused the job: {}",
                flag_message(r.field.as_deref(), &r.message, r.template.as_deref())
            )),
            404 if r.error == "not_found" && r.message == "no such endpoint" => {
                anyhow!("{url} has no job API: is it an sdgen-server?")
            }
            _ => anyhow!("the server at {url} answered {status}: {}", r.message),
        }
    }
}

/// The refusal in `response`'s body, or its text as the message.
fn read_refusal(response: ureq::Response) -> Refusal {
    let text = response.into_string().unwrap_or_default();
    serde_json::from_str::<Refusal>(&text)
        .ok()
        .filter(|r| !r.message.is_empty())
        .unwrap_or(Refusal { message: text.trim().to_string(), ..Default::default() })
}

/// The server's message worded with the CLI's flags: its `template` filled in where it sent
/// one (an engine error, every field it names a flag: "raise --strength or --steps"); else the
/// `message` (about the job API's `field`) with the field named as the flag for it:
/// "width 100 is not a multiple of 8" → "--width 100 is not a multiple of 8".
pub fn flag_message(field: Option<&str>, message: &str, template: Option<&str>) -> String {
    if let Some(t) = template {
        return sdgen::error::fill(t, &crate::args::flag);
    }
    let Some((field, flag)) = field.and_then(|f| flag(f).map(|flag| (f, flag))) else {
        return message.to_string();
    };
    match message.strip_prefix(field) {
        Some(rest) if rest.is_empty() || rest.starts_with([' ', ':']) => format!("{flag}{rest}"),
        _ => format!("{flag}: {message}"),
    }
}

/// The flag that sets a job API field: the engine's fields through the CLI's table, and the
/// fields only the job API has.
fn flag(field: &str) -> Option<&'static str> {
    match field {
        "model" => Some("--model"),
        "batch_size" => Some("--batch-size"),
        "prompts" => Some("--prompt-file"),
        "upscale.factor" => Some("--upscale"),
        "upscale.hires_strength" => Some("--hires-strength"),
        f if f == "loras" || f.starts_with("loras[") => Some("--lora"),
        f => sdgen::engine::FIELDS.iter().find(|&&known| known == f).and_then(|&known| crate::args::flag(known)),
    }
}

/// A job's event stream (server-sent events), read as it comes.
pub struct Events {
    reader: BufReader<Box<dyn Read + Send + Sync + 'static>>,
    url: String,
}

impl Iterator for Events {
    type Item = anyhow::Result<JobEvent>;

    /// The next event; `None` when the stream ends.
    fn next(&mut self) -> Option<Self::Item> {
        // https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation:
        // `field: value` lines, a blank line ends an event, `:` lines are comments (keep-alive).
        let mut data = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(anyhow!("the event stream from {} broke: {e}", self.url))),
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                return Some(
                    serde_json::from_str(&data)
                        .with_context(|| format!("an event from {} is not one this client knows: {data}", self.url)),
                );
            }
            if let Some(value) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_flag() {
        assert_eq!(
            flag_message(Some("width"), "width 100 is not a multiple of 8", None),
            "--width 100 is not a multiple of 8"
        );
        assert_eq!(
            flag_message(Some("n"), "n 20 is more than this server's limit", None),
            "--n 20 is more than this server's limit"
        );
        assert_eq!(
            flag_message(Some("model"), "model `x` is not a model this server serves", None),
            "--model `x` is not a model this server serves"
        );
        assert_eq!(flag_message(Some("skip_layer_guidance"), "needs SD 3.5", None), "--slg: needs SD 3.5");
        assert_eq!(
            flag_message(Some("body"), "the body must be a JSON object", None),
            "the body must be a JSON object"
        );
        assert_eq!(flag_message(None, "the job does not fit", None), "the job does not fit");
        // An engine error's template: every field it names is a flag.
        let template = "{strength} 0.1 with 4 steps leaves no step to run: raise {strength} or {steps}";
        assert_eq!(
            flag_message(Some("strength"), "strength 0.1 … raise strength or steps", Some(template)),
            "--strength 0.1 with 4 steps leaves no step to run: raise --strength or --steps"
        );
    }

    #[test]
    fn server_sent_events_are_read_with_comments_and_split_data() {
        let stream = ": keep-alive\n\nevent: step\ndata: {\"type\":\"step\",\"step\":1,\n\
                      data: \"steps\":2,\"images_done\":0,\"images\":1}\n\nevent: done\r\ndata: {\"type\":\"done\",\"images\":1}\r\n\r\n";
        let reader: Box<dyn Read + Send + Sync> = Box::new(std::io::Cursor::new(stream.as_bytes().to_vec()));
        let events: Vec<JobEvent> =
            Events { reader: BufReader::new(reader), url: "u".into() }.map(Result::unwrap).collect();
        assert_eq!(
            events,
            [JobEvent::Step { step: 1, steps: 2, images_done: 0, images: 1 }, JobEvent::Done { images: 1 }]
        );
    }
}
