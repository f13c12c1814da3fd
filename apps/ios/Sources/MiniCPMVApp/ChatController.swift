import Foundation
import MiniCPMVCore
import SwiftUI
import UIKit

/// The app's state: the bundle, the engine, one turn at a time, streamed text and timings.
/// Model work runs in a detached task; UI updates hop back to the main actor.
@MainActor
final class ChatController: ObservableObject {
    @Published var status = "Looking for a bundle in Documents…"
    @Published var answer = ""
    @Published var stats = ""
    @Published var busy = false
    @Published var ready = false
    @Published var image: ImagePixels?
    @Published var imageName = ""
    @Published var imageDecodeMs = 0.0
    @Published var computePlan = ComputePlan.default

    private var session: ChatSession?
    private var manifest: BundleManifest?
    private var answerVersion = 0

    /// The answer so far, appended to from the model's task; each append carries a version so the
    /// main actor never replaces newer text by older text.
    final class StreamedText: @unchecked Sendable {
        private let lock = NSLock()
        private var text = ""
        private var version = 0

        func append(_ piece: String) -> (String, Int) {
            lock.lock()
            defer { lock.unlock() }
            text += piece
            version += 1
            return (text, version)
        }
    }

    /// Scans Documents and loads the first Core ML bundle (compiling its packages on first launch).
    func loadBundle() {
        guard !busy else { return }
        let (bundles, problems) = BundleStore.scan()
        guard let found = bundles.first else {
            status =
                (problems.first.map { "No usable bundle: \($0)" }
                    ?? "No bundle yet: copy a folder made by `minicpmv-edge export --target ios` into this app's "
                    + "Documents with the Files app, then tap Reload.")
            return
        }
        busy = true
        status = "Loading \(found.url.lastPathComponent) (the first launch compiles the models; this takes a while)…"
        let plan = computePlan
        Task.detached(priority: .userInitiated) {
            do {
                let start = Date()
                let texts = try BundleTexts(bundle: found.url, manifest: found.manifest)
                let engine = try await CoreMLEngine.load(bundle: found.url, manifest: found.manifest, plan: plan)
                let session = try ChatSession(engine: engine, manifest: found.manifest, texts: texts)
                let seconds = Date().timeIntervalSince(start)
                await MainActor.run {
                    self.session = session
                    self.manifest = found.manifest
                    self.ready = true
                    self.busy = false
                    self.status =
                        "\(found.url.lastPathComponent): \(found.manifest.quantization), loaded in "
                        + String(format: "%.1f s", seconds)
                }
            } catch {
                await MainActor.run {
                    self.busy = false
                    self.status = "Could not load \(found.url.lastPathComponent): \(error)"
                }
            }
        }
    }

    func setImage(data: Data, name: String) {
        let start = Date()
        do {
            image = try ImageLoading.pixels(from: data)
            imageDecodeMs = Date().timeIntervalSince(start) * 1000
            imageName = name
        } catch {
            status = "\(error)"
        }
    }

    func setImage(capture: UIImage) {
        let start = Date()
        do {
            image = try ImageLoading.pixels(from: capture)
            imageDecodeMs = Date().timeIntervalSince(start) * 1000
            imageName = "camera.jpg"
        } catch {
            status = "\(error)"
        }
    }

    /// One question about the current photo (or text only), with the answer streamed in.
    func ask(_ question: String) {
        guard let session, !busy, !question.trimmingCharacters(in: .whitespaces).isEmpty else { return }
        busy = true
        answer = ""
        answerVersion = 0
        stats = ""
        let images = image.map { [$0] } ?? []
        let decodeMs = imageDecodeMs
        Task.detached(priority: .userInitiated) {
            do {
                let streamed = StreamedText()
                let result = try await session.ask(question, images: images) { piece in
                    let (text, version) = streamed.append(piece)
                    Task { @MainActor in
                        if version > self.answerVersion {
                            self.answerVersion = version
                            self.answer = text
                        }
                    }
                }
                await MainActor.run {
                    self.stats = String(
                        format:
                            "TTFT %.0f ms (decode %.0f + preprocess %.0f + vision %.0f + prefill %.0f) · %.1f tok/s · %d tokens",
                        decodeMs + result.ttftMs, decodeMs, result.preprocessMs, result.visionMs, result.prefillMs,
                        result.decodeTokS, result.tokenIds.count)
                    self.busy = false
                }
            } catch {
                await MainActor.run {
                    self.answer += "\n[error] \(error)"
                    self.busy = false
                }
            }
        }
    }

    /// Timing runs for `bench --device-report`: 1 warm-up, then 3 runs decoding exactly 64 tokens on
    /// the current photo (or a fixed synthetic 1000x600 picture); the report lands in Documents.
    func benchmark() {
        guard let session, let manifest, !busy else { return }
        busy = true
        status = "Benchmark: 1 warm-up + 3 timed runs…"
        let picture = image ?? ImageLoading.benchmarkImage()
        let name = image == nil ? "synthetic-1000x600" : imageName
        let decodeMs = image == nil ? 0 : imageDecodeMs
        Task.detached(priority: .userInitiated) {
            do {
                var options = AskOptions()
                options.sampling.maxNewTokens = 64
                options.ignoreStopTokens = true
                var report = DeviceReport(
                    manifest: manifest,
                    facts: .init(
                        device: ChatController.deviceModel(), osVersion: UIDevice.current.systemVersion,
                        appVersion: Bundle.main.infoDictionary?["CFBundleShortVersionString"] as? String ?? "0"),
                    settings: .init(
                        image: name, width: picture.width, height: picture.height,
                        downsampleMode: session.sliceConfig.downsampleMode,
                        maxSliceNums: session.sliceConfig.maxSliceNums,
                        decodeTokens: 64))
                _ = try await session.ask("Describe this image.", images: [picture], options: options)
                for _ in 0..<3 {
                    let stats = try await session.ask("Describe this image.", images: [picture], options: options)
                    try report.addRun(stats, imageDecodeMs: decodeMs, peakMemoryMB: ChatController.footprintMB())
                }
                let url = try BundleStore.save(report: try report.json())
                await MainActor.run {
                    self.status = "Device report written: Documents/\(url.lastPathComponent)"
                    self.busy = false
                }
            } catch {
                await MainActor.run {
                    self.status = "Benchmark failed: \(error)"
                    self.busy = false
                }
            }
        }
    }

    /// The hardware model identifier, e.g. "iPhone17,2".
    nonisolated static func deviceModel() -> String {
        var info = utsname()
        uname(&info)
        return withUnsafeBytes(of: &info.machine) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    /// The process's physical footprint in MB (what iOS's memory limit counts).
    nonisolated static func footprintMB() -> Double? {
        var info = task_vm_info_data_t()
        var count = mach_msg_type_number_t(MemoryLayout<task_vm_info_data_t>.size / MemoryLayout<natural_t>.size)
        let result = withUnsafeMutablePointer(to: &info) { pointer in
            pointer.withMemoryRebound(to: integer_t.self, capacity: Int(count)) {
                task_info(mach_task_self_, task_flavor_t(TASK_VM_INFO), $0, &count)
            }
        }
        return result == KERN_SUCCESS ? Double(info.phys_footprint) / 1_048_576 : nil
    }
}
