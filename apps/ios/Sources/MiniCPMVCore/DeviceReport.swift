import Foundation

/// The device report the app writes after timing runs (docs/bundle.md#device-report), which
/// `minicpmv-edge bench --device-report FILE` checks against the published phone targets.
/// Pure data: the app supplies the device facts and the timed turns, and gets the JSON text.
public struct DeviceReport: Sendable {
    public static let schemaVersion = 1

    public struct Settings: Sendable {
        public var image: String
        public var width: Int
        public var height: Int
        public var downsampleMode: DownsampleMode
        public var maxSliceNums: Int
        public var decodeTokens: Int

        public init(
            image: String, width: Int, height: Int, downsampleMode: DownsampleMode, maxSliceNums: Int, decodeTokens: Int
        ) {
            self.image = image
            self.width = width
            self.height = height
            self.downsampleMode = downsampleMode
            self.maxSliceNums = maxSliceNums
            self.decodeTokens = decodeTokens
        }
    }

    public struct Facts: Sendable {
        public var device: String
        public var osVersion: String
        public var appVersion: String

        public init(device: String, osVersion: String, appVersion: String) {
            self.device = device
            self.osVersion = osVersion
            self.appVersion = appVersion
        }
    }

    public let family: String
    public let format: String
    public let quantization: String
    public let manifestSha256: String
    public let facts: Facts
    public let settings: Settings
    public private(set) var runs: [[String: Double]] = []

    public init(
        family: String, format: String, quantization: String, manifestSha256: String, facts: Facts, settings: Settings
    ) {
        self.family = family
        self.format = format
        self.quantization = quantization
        self.manifestSha256 = manifestSha256
        self.facts = facts
        self.settings = settings
    }

    public init(manifest: BundleManifest, facts: Facts, settings: Settings) {
        self.init(
            family: manifest.family, format: manifest.format, quantization: manifest.quantization,
            manifestSha256: manifest.manifestSha256, facts: facts, settings: settings)
    }

    /// One timed turn; imageDecodeMs is the platform decode, which TTFT includes (image bytes in ->
    /// first token). peakMemoryMB is optional (the app reads its footprint).
    public mutating func addRun(_ stats: ChatStats, imageDecodeMs: Double, peakMemoryMB: Double? = nil) throws {
        guard stats.decodeTokS > 0 else {
            throw CoreError.invalid("a timed run needs decode steps (set ignoreStopTokens and maxNewTokens >= 2)")
        }
        var run: [String: Double] = [
            "ttft_ms": imageDecodeMs + stats.ttftMs, "decode_tok_s": stats.decodeTokS, "image_decode_ms": imageDecodeMs,
            "preprocess_ms": stats.preprocessMs, "vision_ms": stats.visionMs, "prefill_ms": stats.prefillMs,
            "first_sample_ms": stats.firstSampleMs, "decode_tokens": Double(stats.decodeTokens),
        ]
        if let peakMemoryMB {
            run["peak_rss_mb"] = peakMemoryMB
        }
        runs.append(run)
    }

    /// The report as JSON text (sorted keys, pretty-printed).
    public func json() throws -> String {
        guard !runs.isEmpty else { throw CoreError.invalid("a device report needs at least one run") }
        guard !facts.device.isEmpty else { throw CoreError.invalid("a device report needs the device name") }
        let object: [String: Any] = [
            "schema_version": DeviceReport.schemaVersion, "family": family, "device": facts.device, "platform": "ios",
            "os_version": facts.osVersion, "app_version": facts.appVersion,
            "bundle": ["format": format, "quantization": quantization, "manifest_sha256": manifestSha256],
            "settings": [
                "image": settings.image, "width": settings.width, "height": settings.height,
                "downsample_mode": settings.downsampleMode.rawValue, "max_slice_nums": settings.maxSliceNums,
                "decode_tokens": settings.decodeTokens,
            ],
            "runs": runs,
        ]
        let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
        return String(decoding: data, as: UTF8.self) + "\n"
    }
}
